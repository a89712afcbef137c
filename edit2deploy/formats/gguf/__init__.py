"""GGUF (llama.cpp, Ollama): export (full or patch), score in llama.cpp, recognise .gguf files.

gguf = edit2deploy.formats.get_format("gguf")
art = gguf.export(model_dir, "out/model.gguf", "Q4_K_M")               # full conversion
art = gguf.export(model_dir, "out/patched.gguf", None, patch_base=src)  # only edited tensors replaced
scorer = gguf.scorer(art)                                               # llama.cpp, an edit2deploy Scorer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import register_format
from ..base import Artifact, ExportPolicy, Format, Target
from .constants import QUANTS
from .patch import is_gguf


@register_format
class GGUFFormat(Format):
    name = "gguf"
    quants = tuple(QUANTS)
    single_file = True
    options = ("patch_base", "threads", "tokenizer_pre", "edited_tensors")
    simulator_module = ".sim"
    expected = "a GGUF file"

    def is_artifact(self, path: Path) -> bool:
        return path.is_file() and is_gguf(path)

    def export(
        self,
        model_dir: Path | str,
        out: Path | str,
        quant: str | None = "Q8_0",
        policy: ExportPolicy | str | None = None,
        **kwargs: Any,
    ) -> Artifact:
        from .export import export_gguf

        return export_gguf(model_dir, out, quant, policy, **kwargs)

    def describe(self, path: Path) -> Artifact:
        from .export import describe

        return describe(path)

    def check(self, artifact: Artifact) -> list[str]:
        from .export import check_artifact

        return check_artifact(artifact)

    def open_scorer(self, artifact: Artifact, **kwargs: Any):
        from .scorer import LlamaCppScorer

        return LlamaCppScorer(artifact.path, **kwargs)

    def export_baseline(self, artifact: Artifact, base_model_dir: Path | str, out: Path | str) -> Artifact:
        from .export import export_paired_baseline

        return export_paired_baseline(artifact, base_model_dir, out)

    def after_export(self, artifact: Artifact, model_dir: Path) -> list[Path]:
        """An Ollama Modelfile next to the GGUF: `ollama create NAME -f model-Q4_K_M.Modelfile`."""
        from ...atomic import atomic_file
        from .modelfile import modelfile_for

        (path,) = self.extra_files(artifact)
        with atomic_file(path, "w") as fh:
            fh.write(modelfile_for(artifact.path.name, model_dir))
        return [path]

    def extra_files(self, artifact: Artifact) -> list[Path]:
        return [Path(artifact.path).with_suffix(".Modelfile")]

    def artifact_name(self, target: Target) -> str:
        return super().artifact_name(target).replace("model-gguf-", "model-", 1) + ".gguf"
