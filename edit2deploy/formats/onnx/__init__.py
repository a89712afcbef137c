"""ONNX (onnxruntime, onnxruntime-genai): export with the model builder or a torch fallback, score in
onnxruntime-genai (builder output) or onnxruntime, recognise ONNX directories.

    onnx = edit2deploy.formats.get_format("onnx")
    art = onnx.export(model_dir, "out/model-int4", "int4", block_size=128)
    scorer = onnx.scorer(art)

The hooks (export, describe, check, open_scorer, export_baseline) are in `export.py`.
"""

from __future__ import annotations

from pathlib import Path

from .. import register_format
from ..base import Format

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
    expected = f"an ONNX model directory (no {MODEL_FILE})"

    def is_artifact(self, path: Path) -> bool:
        return path.is_dir() and (path / MODEL_FILE).is_file()
