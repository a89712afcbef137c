"""bitsandbytes quantization simulated in torch (`get_format("bnb").scheme(...)`), with bitsandbytes' own kernels.

transformers' bitsandbytes integration replaces every `nn.Linear` except the output head (and the modules in
`llm_int8_skip_modules`) by a quantized layer:
- int8 (LLM.int8): row-wise absmax over the input dimension, `CB = round(127·W/absmax)`; the runtime multiplies
  with `CB·absmax/127` (outlier activation columns too, since the float weight is gone). Activations are also
  quantized row-wise at run time: that part is not simulated (weight rounding dominates verdict flips).
- nf4: blocks of 64 along the flattened weight, absmax-scaled NF4 code book (`quantize_4bit` /
  `dequantize_4bit`, no double quantization: transformers' default).
Edited modules are kept float when the protection floor is above the target (`skipped_modules`): the same rule
the bnb exporter applies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edit2deploy.errors import UsageError
from edit2deploy.quantsim import TensorQuant

from ..base import ExportPolicy, edited_tensor_list, target_label

QUANT_BITS = {"int8": 8, "nf4": 4, "fp4": 4}
NF4_BLOCK = 64


def require_bnb():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise UsageError("bitsandbytes is not installed: pip install 'edit2deploy[bnb]'") from exc
    return bitsandbytes


def norm_quant(quant: str | None) -> str:
    q = (quant or "").strip().lower()
    if q not in QUANT_BITS:
        raise UsageError(f"--quant {quant}: the bnb format takes one of {', '.join(QUANT_BITS)}")
    return q


def skipped_modules(quant: str, policy: ExportPolicy, edited: Sequence[str]) -> list[str]:
    """Module names (of edited weights) kept out of quantization because the floor is above `quant`."""
    if ExportPolicy.coerce(policy).protect_edits.bits <= QUANT_BITS[quant]:
        return []
    return sorted({name.removesuffix(".weight") for name in edited})


def int8_fake(w: torch.Tensor) -> torch.Tensor:
    """LLM.int8 weight rounding: row-wise absmax int8, dequantized."""
    import bitsandbytes.functional as bf

    cb, scb, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
    return (cb.float() * scb.float()[:, None] / 127.0).to(w.dtype)


def nf4_fake(w: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """4-bit (NF4/FP4) blockwise rounding, with bitsandbytes' own quantize/dequantize."""
    import bitsandbytes.functional as bf

    q, state = bf.quantize_4bit(
        w.contiguous(), blocksize=NF4_BLOCK, quant_type=quant_type, compress_statistics=False
    )
    return bf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


def _linear_weights(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names of the weights transformers would quantize: every 2-D Linear weight but the output head."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                shape = tuple(fh.get_slice(name).get_shape())
                if len(shape) != 2 or not name.endswith(".weight"):
                    continue
                if "embed" in name or name.startswith("lm_head") or (tied and "wte" in name):
                    continue
                if "norm" in name:
                    continue
                out[name] = shape
    return out


@dataclass
class BnbScheme:
    target: str
    quant: str
    weights: dict[str, tuple[int, ...]]
    skipped: list[str]

    def plan(self) -> dict[str, TensorQuant]:
        fake = int8_fake if self.quant == "int8" else (lambda w, qt=self.quant: nf4_fake(w, qt))
        skip = set(self.skipped)
        return {
            name: TensorQuant("float32", None)
            if name.removesuffix(".weight") in skip
            else TensorQuant(self.quant, fake)
            for name in self.weights
        }


class BnbSimulator:
    name = "bnb"

    def scheme(
        self,
        model_dir: Path | str,
        quant: str | None,
        policy: ExportPolicy | str | None = None,
        *,
        edited_tensors: Sequence[str] | None = None,
        **_: object,
    ) -> BnbScheme:
        require_bnb()
        model_dir = Path(model_dir)
        quant = norm_quant(quant)
        policy = ExportPolicy.coerce(policy)
        edited = edited_tensor_list(model_dir, edited_tensors)
        label = target_label("bnb", quant, policy.protect_edits)
        return BnbScheme(label, quant, _linear_weights(model_dir), skipped_modules(quant, policy, edited))


SIMULATOR = BnbSimulator()
