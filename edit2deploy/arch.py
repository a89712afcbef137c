"""Architecture registry: where each model family keeps the tensors that editing touches.

Adding a family is one `Architecture(...)` entry in `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UsageError


@dataclass(frozen=True)
class Architecture:
    """Where the edited MLP out-projection and the residual stream live in one model family."""

    name: str
    model_types: tuple[str, ...]  # `config.model_type` values handled by this entry
    layers: str  # the ModuleList of decoder blocks
    mlp_out: str  # edited projection, "{}" = layer index
    transposed: bool = False  # GPT-2 Conv1D stores weight as (in, out)
    gguf_arch: str | None = None  # llama.cpp architecture name, when GGUF export supports it
    permute_qk: bool = False  # llama.cpp's converter permutes Q/K rows for this family
    # Default edited layers keyed by number of decoder layers (chosen by a sweep; see README).
    default_layers: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def block_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def weight_name(self, layer: int) -> str:
        return self.mlp_out_name(layer) + ".weight"

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """Default edited layers: the table entry, or a window at ~15-30% depth (MEMIT's region)."""
        if num_layers in self.default_layers:
            return self.default_layers[num_layers]
        if num_layers < 1:
            raise ValueError(f"a model needs at least one layer, got {num_layers}")
        start = min(max(1, round(num_layers * 0.15)), num_layers - 1)  # 1 layer: edit layer 0
        stop = max(start + 1, round(num_layers * 0.3))
        return tuple(range(start, min(stop, num_layers)))

    def get_weight(self, model: torch.nn.Module, layer: int) -> torch.Tensor:
        """The edited weight as stored in the module (GPT-2: (in, out))."""
        return model.get_submodule(self.mlp_out_name(layer)).weight

    def to_out_in(self, w: torch.Tensor) -> torch.Tensor:
        """A stored weight (or delta) in the (out, in) layout the math uses."""
        return w.T if self.transposed else w

    def from_out_in(self, w: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight (or delta) in the layout the module stores."""
        return w.T if self.transposed else w


_LLAMA_LIKE = {"layers": "model.layers", "mlp_out": "model.layers.{}.mlp.down_proj"}

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="llama",
            model_types=("llama", "mistral"),
            gguf_arch="llama",
            permute_qk=True,
            # SmolLM2-135M (30 layers): layer sweeps on CounterFact train (and val), benchmarks/RESULTS.md.
            default_layers={30: (4, 5, 6, 7, 8)},
            **_LLAMA_LIKE,
        ),
        Architecture(name="qwen2", model_types=("qwen2",), gguf_arch="qwen2", **_LLAMA_LIKE),
        Architecture(name="qwen3", model_types=("qwen3",), gguf_arch="qwen3", **_LLAMA_LIKE),
        Architecture(name="gemma3", model_types=("gemma3_text",), gguf_arch="gemma3", **_LLAMA_LIKE),
        Architecture(
            name="gpt2",
            model_types=("gpt2",),
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.c_proj",
            transposed=True,
            gguf_arch="gpt2",
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES.values() for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    """The registry entry for a `config.model_type`; a clear error for anything else."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    raise UsageError(
        f"unsupported architecture '{model_type}': supported model types are {', '.join(supported_model_types())}"
    )


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states through the model's own head (tied embeddings, soft-capping), on
    `hidden`'s device (a model dispatched across devices may hold its head on another)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.to(hidden.device)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device in a model dispatched with a device map (its
    weights may be offloaded, on the meta device), else its first parameter's or buffer's device."""
    hooks = [getattr(module, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()))  # a SequentialHook holds several
    for hook in hooks:
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's input ids go to: its input embeddings' execution device."""
    return execution_device(model.get_input_embeddings())
