"""GGUF (llama.cpp, Ollama): export (full or patch), score in llama.cpp, recognise .gguf files.

    gguf = edit2deploy.formats.get_format("gguf")
    art = gguf.export(model_dir, "out/model.gguf", "Q4_K_M")               # full conversion
    art = gguf.export(model_dir, "out/patched.gguf", None, patch_base=src)  # only edited tensors replaced
    scorer = gguf.scorer(art)                                               # llama.cpp, an edit2deploy Scorer

The hooks (export, describe, check, open_scorer, export_baseline) are in `export.py`.
"""

from __future__ import annotations

from pathlib import Path

from ...atomic import atomic_file
from .. import register_format
from ..base import Artifact, Format, Target
from .constants import QUANTS
from .patch import is_gguf


@register_format
class GGUFFormat(Format):
    name = "gguf"
    quants = tuple(QUANTS)
    single_file = True
    options = ("patch_base", "threads", "tokenizer_pre", "edited_tensors")
    expected = "a GGUF file"

    def is_artifact(self, path: Path) -> bool:
        return path.is_file() and is_gguf(path)

    def after_export(self, artifact: Artifact, model_dir: Path) -> list[Path]:
        """An Ollama Modelfile next to the GGUF: `ollama create NAME -f model-Q4_K_M.Modelfile`."""
        from .modelfile import modelfile_for

        (path,) = self.extra_files(artifact)
        with atomic_file(path, "w") as fh:
            fh.write(modelfile_for(artifact.path.name, model_dir))
        return [path]

    def extra_files(self, artifact: Artifact) -> list[Path]:
        return [Path(artifact.path).with_suffix(".Modelfile")]

    def artifact_name(self, target: Target) -> str:
        return super().artifact_name(target).replace("model-gguf-", "model-", 1) + ".gguf"
