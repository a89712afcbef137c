"""Precision by role: the model's weights in the checkpoint's dtype, the edited projections in float32.

A 7-8B model only fits a 24-32 GB machine in bf16/fp16, but an edit is a small ΔW added to W: rounded to bf16
(8 significant bits) part of it is lost. So the projections an edit touches are held in float32 in memory
(their bf16 values upcast exactly) and stored in float32 next to the bf16 tensors of the same safetensors file
(docs/formats.md, "Weights precision"); a forward through them casts its input up and its output back down.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UsageError

# `--dtype` choices: the precision the model's weights are loaded in ("auto": the checkpoint's own).
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
# config.json / safetensors spellings of the dtypes a checkpoint may be stored in
_STORED = {
    "bfloat16": torch.bfloat16,
    "BF16": torch.bfloat16,
    "float16": torch.float16,
    "F16": torch.float16,
    "float32": torch.float32,
    "F32": torch.float32,
}


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def checkpoint_dtype(model_dir: Path, config: dict) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in: config.json's `dtype` (`torch_dtype` before
    transformers 4.56), else the first floating tensor's in the safetensors header, else float32."""
    for key in ("dtype", "torch_dtype"):
        if config.get(key) in _STORED:
            return _STORED[config[key]]
    for f in weight_files(model_dir):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(min(n, 100 << 20)))
        except (OSError, ValueError):
            break
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype") in _STORED:
                return _STORED[info["dtype"]]
    return torch.float32


def weights_dtype(setting: str, model_dir: Path, config: dict) -> torch.dtype:
    """The dtype `--dtype setting` loads `model_dir` in."""
    if setting not in WEIGHT_DTYPES:
        raise UsageError(f"--dtype: '{setting}' (expected one of {', '.join(WEIGHT_DTYPES)})")
    return WEIGHT_DTYPES[setting] or checkpoint_dtype(model_dir, config)


def stored_float32(model_dir: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Those of the tensors `names` that `model_dir` stores in float32 (an edited model's edited projections),
    read as stored."""
    wanted, out = set(names), {}
    for f in weight_files(model_dir):
        try:
            with safe_open(str(f), "pt") as fh:
                for name in wanted & set(fh.keys()):
                    if fh.get_slice(name).get_dtype() == "F32":
                        out[name] = fh.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{f}: unreadable weights ({exc})") from exc
    return out


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (Linux flags amx_bf16 / avx512_bf16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def upcasts_half_linears(device: torch.device) -> bool:
    """Whether half-precision linears on `device` multiply in float32 (`compute_in_float32`, which
    `models.open_model` applies): on a CPU without native bf16. Elsewhere they multiply in their own precision."""
    return device.type == "cpu" and not cpu_has_fast_bf16()


def compute_in_float32(model: torch.nn.Module) -> int:
    """Make every bf16/fp16 `nn.Linear` of `model` multiply in float32 from its half-precision weight, cast at
    each call; returns how many. Why: on CPUs without native bf16 (AVX2) torch's bf16 matmul runs ~3-6x slower
    than float32, while upcasting one weight per call costs little next to the product, so the model keeps
    bf16's memory at float32's speed (one layer's float32 copy at a time, in one buffer the model's linears
    share: `_Float32Scratch`)."""
    scratch = _Float32Scratch()
    n = 0
    for lin in model.modules():
        if type(lin) is not torch.nn.Linear or lin.weight.dtype == torch.float32:
            continue
        if "forward" not in vars(lin):
            lin.forward = _float32_forward(lin, scratch)
        elif getattr(getattr(lin, "_old_forward", None), "__func__", None) is torch.nn.Linear.forward:
            # dispatched with a device map: accelerate's hook calls `_old_forward` once the weights are in place
            lin._old_forward = _float32_forward(lin, scratch)
        else:
            continue
        n += 1
    return n


class _Float32Scratch:
    """The float32 copy of one half-precision CPU weight at a time, in a buffer reused call after call.

    Why not a fresh `weight.float()` per call: glibc serves those copies (1-16 MiB) from its heap once its mmap
    threshold has risen past them, and the small activations autograd keeps between them split the freed space,
    so a z-optimisation step grew the process by about the blocks' bf16 size per forward (550 MiB per forward
    on a 0.4B model). Copies over 32 MiB (glibc's largest threshold: an LM head) are mapped and unmapped whole,
    so they stay per call rather than holding the buffer that large. Calls must not overlap (one forward or
    backward at a time)."""

    LARGEST = 32 * 2**20 // 4  # elements

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def upcast(self, weight: torch.Tensor) -> torch.Tensor:
        n = weight.numel()
        if weight.device.type != "cpu" or n > self.LARGEST:
            return weight.float()
        if n > self.buffer.numel():
            self.buffer = torch.empty(n, dtype=torch.float32)
        return self.buffer[:n].view(weight.shape).copy_(weight)


class _UpcastLinear(torch.autograd.Function):
    """y = x Wᵀ + b in float32 from a half-precision frozen W. Backward upcasts W again rather than keeping the
    forward's float32 copy: saved for backward, those copies would add up to the model in float32 (z-optimisation
    backpropagates through every layer above the edited one)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scratch: _Float32Scratch
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.scratch = scratch
        b = None if bias is None else bias.float()
        return torch.nn.functional.linear(x.float(), scratch.upcast(weight), b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad.float() @ ctx.scratch.upcast(weight)).to(grad.dtype), None, None, None


def _float32_forward(lin: torch.nn.Linear, scratch: _Float32Scratch):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or lin.weight.requires_grad:
            return torch.nn.functional.linear(x, lin.weight, lin.bias)
        return _UpcastLinear.apply(x, lin.weight, lin.bias, scratch)

    return forward


def _cast_input(module: torch.nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x.to(module.weight.dtype), *args[1:]) if x.dtype != module.weight.dtype else args


def hold_in_float32(
    model: torch.nn.Module, module_names: Iterable[str], values: dict[str, torch.Tensor] | None = None
) -> list[str]:
    """Hold the weights of the named linear modules in float32 (`values`: exact float32 weights by tensor name,
    else the module's own upcast exactly), their forward casting the input up and the output back to the model's
    dtype. Modules already float32 are left alone; returns the modules changed."""
    values = values or {}
    model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    changed = []
    for name in module_names:
        module = model.get_submodule(name)
        if module.weight.dtype == torch.float32:
            continue
        w = values.get(f"{name}.weight")
        w = module.weight.detach().float() if w is None else w.to(module.weight.device)
        module.weight = torch.nn.Parameter(w, requires_grad=False)
        if getattr(module, "bias", None) is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        module.register_forward_pre_hook(_cast_input)
        module.register_forward_hook(lambda _m, _args, out, dt=model_dtype: out.to(dt))
        changed.append(name)
    return changed


def held_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's weights are held in (the edited projections may be float32 beside it)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)
