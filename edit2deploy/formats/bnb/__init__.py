"""bitsandbytes (int8 / nf4 / fp4): a serialized bitsandbytes checkpoint, scored in torch + bitsandbytes.

    bnb = edit2deploy.formats.get_format("bnb")
    art = bnb.export(model_dir, "out/model-bnb-nf4", "nf4")
    scorer = bnb.scorer(art)

The hooks (export, describe, check, open_scorer, export_baseline) are in `export.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import register_format
from ..base import Format

QUANTS = ("int8", "nf4", "fp4")
QUANT_METHOD = "bitsandbytes"
INSTALL_HINT = "pip install 'edit2deploy[bnb]'"


def is_bnb_dir(path: Path | str) -> bool:
    """A directory whose config.json says it holds a bitsandbytes-quantized checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


@register_format
class BnbFormat(Format):
    name = "bnb"
    quants = QUANTS
    options = ("options", "compute_dtype", "dtype", "double_quant", "int8_threshold", "edited_tensors")
    expected = f"a bitsandbytes checkpoint (no quantization_config with quant_method '{QUANT_METHOD}' in config.json)"

    def is_artifact(self, path: Path) -> bool:
        return is_bnb_dir(path)
