"""Forward-pass shortcuts that keep using the model's own modules (so any architecture works).

- `run_until_stop`: a hook raises `StopForward` once it has what it needs; layers above are skipped.
- `replay_lower_blocks`: blocks up to a layer return cached outputs instead of computing them
  (z-optimisation changes nothing below the edited layer, so those blocks need to run only once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been captured."""


def run_until_stop(module: torch.nn.Module, **inputs) -> None:
    """Run a forward pass that a hook may cut short with `StopForward` (no cache unless `inputs` bring one)."""
    try:
        module(**({"use_cache": False} | inputs))
    except StopForward:
        pass


@contextlib.contextmanager
def replay_lower_blocks(
    blocks: list[torch.nn.Module], top_output: Callable[[], torch.Tensor], returns_tuple: bool
) -> Iterator[None]:
    """Blocks before the last pass their input through; the last returns `top_output()`.

    `returns_tuple` mirrors the real blocks' return type (some families return `(hidden, ...)`).
    """

    def wrap(h: torch.Tensor):
        return (h,) if returns_tuple else h

    def passthrough(hidden_states, *args, **kwargs):
        return wrap(hidden_states)

    def top(hidden_states, *args, **kwargs):
        return wrap(top_output())

    # A block may already have a forward of its own (accelerate's hook in a model dispatched with a device map):
    # put back whatever was there.
    saved = [vars(b).get("forward") for b in blocks]
    for b in blocks[:-1]:
        b.forward = passthrough
    blocks[-1].forward = top
    try:
        yield
    finally:
        for b, own in zip(blocks, saved, strict=True):
            if own is None:
                del b.forward  # back to the class's forward
            else:
                b.forward = own


def recompute_offloaded(model: torch.nn.Module) -> int:
    """Make the forward of every module whose weights accelerate offloads (a model dispatched with a device map:
    "disk", or "cpu" beside a GPU) a checkpoint; returns how many.

    Why: accelerate loads an offloaded module's weights for its forward and offloads them after it, but autograd
    keeps what the forward saved, the loaded weights included, until the backward: a z-optimisation step (its
    backward runs through every block above the z layer) would hold every offloaded weight at once. Recomputed
    in the backward instead, a module's weights are loaded again for its own backward only. Outside autograd
    (no_grad, statistics, scoring) the forward runs as it was. Only leaf modules carry these hooks, so a
    recomputation never touches a KV cache."""
    n = 0
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False) or "forward" not in vars(m):
            continue
        m.forward = _recomputed(m.forward)
        n += 1
    return n


def _recomputed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # No early stop: the recomputation must run to its end, where accelerate offloads the weights again.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in oneDNN's blocked layout (in `dtype`), reordered once instead of at every call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype).contiguous(), 512)


class _PackedLinear:
    """A frozen linear's weight packed for oneDNN in `dtype`: W for forwards, Wᵀ (packed on first use) for
    the input gradient dx = dy W."""

    def __init__(self, lin: torch.nn.Linear, dtype: torch.dtype = torch.float32):
        self.source = lin.weight
        self.dtype = dtype
        self.bias = None if lin.bias is None else lin.bias.detach().to(dtype)
        self.weight = _pack(lin.weight, dtype)
        self._weight_t: torch.Tensor | None = None

    @property
    def weight_t(self) -> torch.Tensor:
        if self._weight_t is None:
            self._weight_t = _pack(self.source.t(), self.dtype)
        return self._weight_t


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W fixed, through oneDNN both ways; no weight gradient. With a bf16 pack the
    product runs in bf16 (fp32 accumulation) and its input and output stay float32, so only the linears
    change precision — as under autocast, without re-casting every weight at every call."""

    @staticmethod
    def forward(ctx, x, packed):
        ctx.packed = packed
        return _onednn_linear(x.to(packed.dtype), packed.weight, packed.bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        dt = ctx.packed.dtype
        return _onednn_linear(grad.to(dt).contiguous(), ctx.packed.weight_t, None).to(grad.dtype), None


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether frozen linears can run through oneDNN in `dtype` (bf16 needs a CPU that oneDNN multiplies it on)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@contextlib.contextmanager
def frozen_linears_on_onednn(
    modules: list[torch.nn.Module], dtype: torch.dtype = torch.float32
) -> Iterator[None]:
    """Inside: every frozen float32 CPU `nn.Linear` (the class itself) under `modules` multiplies through oneDNN with its
    weight packed once, in `dtype` (the weights must not change inside).

    Why: MKL's sgemm takes a generic path on AMD CPUs; oneDNN runs the same fp32 products 10-20% faster
    there (benchmarks/RESULTS.md), and only the summation order changes. `dtype=torch.bfloat16` packs the
    weights in bf16 for CPUs that multiply it natively (AMX): the products then run ~9x the fp32 rate with
    no per-call weight cast, which CPU autocast pays at every call. Autocast and weights that need
    gradients keep the stock path; without oneDNN this does nothing.
    """
    patched: list[torch.nn.Linear] = []
    if onednn_available(dtype):
        for m in modules:
            for lin in m.modules():
                # Exactly nn.Linear: subclasses (bitsandbytes, quantizers) have their own forward.
                if type(lin) is not torch.nn.Linear or "forward" in vars(lin):
                    continue
                w = lin.weight
                if w.requires_grad or w.dtype != torch.float32 or w.device.type != "cpu":
                    continue
                lin.forward = _frozen_forward(lin, _PackedLinear(lin, dtype))
                patched.append(lin)
    try:
        yield
    finally:
        for lin in patched:
            del lin.forward


def _frozen_forward(lin: torch.nn.Linear, packed: _PackedLinear):
    stock = type(lin).forward.__get__(lin)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return stock(x)
        return _FrozenLinear.apply(x, packed)

    return forward
