"""bitsandbytes (int8 / nf4 / fp4): a serialized bitsandbytes checkpoint, scored in torch + bitsandbytes.

bnb = edit2deploy.formats.get_format("bnb")
art = bnb.export(model_dir, "out/model-bnb-nf4", "nf4")
scorer = bnb.scorer(art)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import register_format
from ..base import Artifact, ExportPolicy, Format

QUANTS = ("int8", "nf4", "fp4")
QUANT_METHOD = "bitsandbytes"
INSTALL_HINT = "pip install 'edit2deploy[bnb]'"


@register_format
class BnbFormat(Format):
    name = "bnb"
    quants = QUANTS
    options = ("options", "compute_dtype", "dtype", "double_quant", "int8_threshold", "edited_tensors")
    simulator_module = ".sim"
    expected = f"a bitsandbytes checkpoint (no quantization_config with quant_method '{QUANT_METHOD}' in config.json)"

    def is_artifact(self, path: Path) -> bool:
        from .export import is_bnb_dir

        return is_bnb_dir(path)

    def export(
        self,
        model_dir: Path | str,
        out: Path | str,
        quant: str | None = "nf4",
        policy: ExportPolicy | str | None = None,
        **kwargs: Any,
    ) -> Artifact:
        from .export import export_bnb

        return export_bnb(model_dir, out, quant, policy, **kwargs)

    def describe(self, path: Path) -> Artifact:
        from .export import describe

        return describe(path)

    def check(self, artifact: Artifact) -> list[str]:
        from .export import check_artifact

        return check_artifact(artifact)

    def open_scorer(self, artifact: Artifact, **kwargs: Any):
        from .scorer import open_scorer

        return open_scorer(artifact, **kwargs)

    def export_baseline(self, artifact: Artifact, base_model_dir: Path | str, out: Path | str) -> Artifact:
        from .export import export_paired_baseline

        return export_paired_baseline(artifact, base_model_dir, out)
