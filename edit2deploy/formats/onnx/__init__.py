"""ONNX (onnxruntime, onnxruntime-genai): export with the model builder or a torch fallback, score in
onnxruntime-genai (builder output) or onnxruntime, recognise ONNX directories.

    onnx = edit2deploy.formats.get_format("onnx")
    art = onnx.export(model_dir, "out/model-int4", "int4", block_size=128)
    scorer = onnx.scorer(art)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import register_format
from ..base import Artifact, ExportPolicy, Format

QUANTS = ("fp32", "fp16", "bf16", "int8", "int4")
MODEL_FILE = "model.onnx"


@register_format
class ONNXFormat(Format):
    name = "onnx"
    quants = QUANTS
    options = (
        "execution_provider",
        "backend",
        "block_size",
        "accuracy_level",
        "embeddings",
        "lm_head",
        "algo",
        "mixed_layers",
        "symmetric",
        "extra",
        "options",
        "edited_tensors",
    )
    simulator_module = ".sim"
    expected = f"an ONNX model directory (no {MODEL_FILE})"

    def is_artifact(self, path: Path) -> bool:
        return path.is_dir() and (path / MODEL_FILE).is_file()

    def export(
        self,
        model_dir: Path | str,
        out: Path | str,
        quant: str | None = "int8",
        policy: ExportPolicy | str | None = None,
        **kwargs: Any,
    ) -> Artifact:
        from .export import export_onnx

        return export_onnx(model_dir, out, quant, policy, **kwargs)

    def describe(self, path: Path) -> Artifact:
        from .export import describe

        return describe(path)

    def check(self, artifact: Artifact) -> list[str]:
        from .export import check_artifact

        return check_artifact(artifact)

    def open_scorer(self, artifact: Artifact, **kwargs: Any):
        from .export import open_scorer

        return open_scorer(artifact, **kwargs)

    def export_baseline(self, artifact: Artifact, base_model_dir: Path | str, out: Path | str) -> Artifact:
        from .export import export_paired_baseline

        return export_paired_baseline(artifact, base_model_dir, out)
