"""Per-family GGUF layout: architecture metadata and the tensor transforms llama.cpp's converter applies.

Families (keyed by `edit2deploy.arch.Architecture.gguf_arch`): llama (Llama, Mistral, SmolLM2: Q/K rows permuted),
qwen2, qwen3, gemma3 (norm weights +1, token embedding cut to the tokenizer), gpt2 (Conv1D weights transposed).
Tensor names come from `gguf.get_tensor_name_map`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch

from edit2deploy.arch import Architecture, architecture_for
from edit2deploy.errors import UsageError

_SKIP_SUFFIXES = (
    ".attention.masked_bias",
    ".attention.bias",
    ".rotary_emb.inv_freq",
    ".attn.bias",
    ".attn.masked_bias",
)


def read_hparams(model_dir: Path) -> dict[str, Any]:
    """config.json, with a multimodal `text_config` lifted to the top (as the converter does)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"{model_dir}: not a Hugging Face model directory (no config.json)") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{model_dir / 'config.json'}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config


def _find(h: dict[str, Any], keys: tuple[str, ...], default: Any = None) -> Any:
    for k in keys:
        if h.get(k) is not None:
            return h[k]
    return default


def rope_parameters(h: dict[str, Any]) -> dict[str, Any]:
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if "rope_theta" not in rope and h.get("rope_theta") is not None:
            rope["rope_theta"] = h["rope_theta"]
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
    return rope


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): HF's rotate-half rows -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- hyperparameters
def _common_hparams(w: gguf.GGUFWriter, h: dict[str, Any], n_layers: int) -> None:
    """TextModel.set_gguf_parameters of the converter (the parts our families use)."""
    w.add_block_count(n_layers)
    if (n_ctx := _find(h, ("max_position_embeddings", "n_ctx", "n_positions"))) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _find(h, ("hidden_size", "n_embd"))) is not None:
        w.add_embedding_length(n_embd)
    if (n_ff := _find(h, ("intermediate_size", "n_inner"))) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _find(h, ("num_attention_heads", "n_head"))) is not None:
        w.add_head_count(n_head)
    if (n_head_kv := _find(h, ("num_key_value_heads",))) is not None:
        w.add_head_count_kv(n_head_kv)
    rope = rope_parameters(h)
    full = rope.get("full_attention", rope)
    rope_type = str(full.get("rope_type") or "").lower()
    factor = full.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    elif rope_type not in ("", "default", "llama3"):
        raise UsageError(f"GGUF export: unsupported RoPE scaling type {rope_type!r}")
    if (theta := full.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (theta_swa := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(theta_swa)
    if (eps := _find(h, ("rms_norm_eps",))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(h, ("layer_norm_eps", "layer_norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    if (head_dim := h.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _llama_hparams(w: gguf.GGUFWriter, h: dict[str, Any], n_layers: int) -> None:
    _common_hparams(w, h, n_layers)
    w.add_vocab_size(h["vocab_size"])
    rope_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    w.add_rope_dimension_count(rope_dim)


def _gemma3_hparams(w: gguf.GGUFWriter, h: dict[str, Any], n_layers: int) -> None:
    """The converter's Gemma3Model.set_gguf_parameters, with its defaults for keys the config leaves out."""
    h = {
        "max_position_embeddings": 131072,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "head_dim": 256,
        **{k: v for k, v in h.items() if v is not None},
    }
    rope = rope_parameters(h)
    if "full_attention" not in rope and "sliding_attention" not in rope:
        full = {**rope, "rope_theta": rope.get("rope_theta", 1_000_000.0)}
        rope = {"full_attention": full}
        if h.get("rope_local_base_freq") is not None:
            rope["sliding_attention"] = {"rope_theta": h["rope_local_base_freq"]}
    _common_hparams(w, {**h, "rope_parameters": rope}, n_layers)
    if h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
    if h.get("sliding_window_pattern") != 1 and h.get("sliding_window") is not None:
        w.add_sliding_window(h["sliding_window"])


def _gpt2_hparams(w: gguf.GGUFWriter, h: dict[str, Any], n_layers: int) -> None:
    w.add_block_count(n_layers)
    w.add_context_length(h.get("n_ctx") or h["n_positions"])
    w.add_embedding_length(h["n_embd"])
    w.add_feed_forward_length(h.get("n_inner") or 4 * h["n_embd"])
    w.add_head_count(h["n_head"])
    w.add_layer_norm_eps(h["layer_norm_epsilon"])


# ---------------------------------------------------------------- families
@dataclass(frozen=True)
class GGUFFamily:
    """How one model family is laid out in GGUF."""

    arch: gguf.MODEL_ARCH
    hparams: Callable[[gguf.GGUFWriter, dict[str, Any], int], None]
    permute_qk: bool = False  # llama-family: Q/K rows permuted for llama.cpp's RoPE
    norm_shift: float = 0.0  # gemma3 stores RMSNorm weights as (1 + w)
    transpose_conv1d: bool = False  # gpt2: Conv1D (in, out) -> (out, in)
    truncate_vocab: bool = False  # gemma3: token embedding cut to the tokenizer's size
    tied_default: bool = False  # tie_word_embeddings when the config does not say
    conv1d_suffixes: tuple[str, ...] = field(default=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))


FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(gguf.MODEL_ARCH.LLAMA, _llama_hparams, permute_qk=True),
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2, _common_hparams),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3, _common_hparams),
    "gemma3": GGUFFamily(
        gguf.MODEL_ARCH.GEMMA3, _gemma3_hparams, norm_shift=1.0, truncate_vocab=True, tied_default=True
    ),
    "gpt2": GGUFFamily(gguf.MODEL_ARCH.GPT2, _gpt2_hparams, transpose_conv1d=True, tied_default=True),
}


@dataclass
class ModelLayout:
    """One model directory seen as a GGUF: family, hyperparameters, HF -> GGUF tensor names, transforms."""

    model_dir: Path
    hparams: dict[str, Any]
    arch: Architecture
    family: GGUFFamily
    n_layers: int
    tensor_map: gguf.TensorNameMap

    @classmethod
    def open(cls, model_dir: Path | str) -> ModelLayout:
        model_dir = Path(model_dir)
        h = read_hparams(model_dir)
        model_type = h.get("model_type", "<missing model_type>")
        if model_type == "gemma3":  # a multimodal config whose text part we export
            model_type = "gemma3_text"
        arch = architecture_for(model_type)
        if arch.gguf_arch not in FAMILIES:
            raise UsageError(f"GGUF export does not support the '{arch.name}' family yet")
        family = FAMILIES[arch.gguf_arch]
        n_layers = _find(h, ("num_hidden_layers", "n_layer"))
        return cls(model_dir, h, arch, family, n_layers, gguf.get_tensor_name_map(family.arch, n_layers))

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.family.arch]

    @property
    def tied(self) -> bool:
        return bool(self.hparams.get("tie_word_embeddings", self.family.tied_default))

    def write_hparams(self, writer: gguf.GGUFWriter) -> None:
        self.family.hparams(writer, self.hparams, self.n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor, or None for tensors llama.cpp does not use."""
        if hf_name.endswith(_SKIP_SUFFIXES):
            return None
        if hf_name == "lm_head.weight" and self.tied:
            return None
        name = (
            hf_name.replace("language_model.", "") if hf_name.startswith("model.language_model.") else hf_name
        )
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.")):
                return None
            raise UsageError(f"GGUF export: no llama.cpp name for tensor '{hf_name}' ({self.arch_name})")
        return new

    def out_shape(self, hf_name: str, shape: tuple[int, ...], n_vocab: int | None) -> tuple[int, ...]:
        if self.family.transpose_conv1d and hf_name.endswith(self.family.conv1d_suffixes) and len(shape) == 2:
            return (shape[1], shape[0])
        if self.family.truncate_vocab and hf_name.endswith("embed_tokens.weight") and n_vocab is not None:
            return (min(shape[0], n_vocab), *shape[1:])
        return tuple(shape)

    def transform(self, hf_name: str, t: torch.Tensor, n_vocab: int | None) -> torch.Tensor:
        """An HF tensor as llama.cpp stores it (float32)."""
        t = t.to(torch.float32)
        h = self.hparams
        if self.family.permute_qk:
            n_head = _find(h, ("num_attention_heads", "n_heads"))
            n_kv = _find(h, ("num_key_value_heads", "n_kv_heads"), n_head)
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_qk(t, n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_qk(t, n_head, n_kv)
        if self.family.transpose_conv1d and hf_name.endswith(self.family.conv1d_suffixes) and t.ndim == 2:
            t = t.T
        if self.family.truncate_vocab and hf_name.endswith("embed_tokens.weight") and n_vocab is not None:
            t = t[:n_vocab]
        if self.family.norm_shift and hf_name.endswith("norm.weight"):
            t = t + self.family.norm_shift
        return t.contiguous()

    def extra_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors the converter generates (Llama 3 rope_freqs)."""
        if self.family.arch != gguf.MODEL_ARCH.LLAMA:
            return
        rope = rope_parameters(self.hparams)
        full = rope.get("full_attention", rope)
        if str(full.get("rope_type", "")).lower() != "llama3":
            return
        h = self.hparams
        base = full.get("rope_theta", 10000.0)
        dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = full.get("factor", 8.0)
        low, high = full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
        old_ctx = full.get("original_max_position_embeddings", 8192)
        low_wl, high_wl = old_ctx / low, old_ctx / high
        out = []
        for f in freqs.tolist():
            wl = 2 * math.pi / f
            if wl < high_wl:
                out.append(1.0)
            elif wl > low_wl:
                out.append(factor)
            else:
                smooth = (old_ctx / wl - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        yield (
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            torch.tensor(out, dtype=torch.float32),
        )


def is_float_only(gguf_name: str, n_dims: int) -> bool:
    """Tensors that stay F32 whatever the target type (the converter's and llama-quantize's rules)."""
    return (
        n_dims <= 1
        or gguf_name.endswith("_norm.weight")
        or not gguf_name.endswith(".weight")
        or gguf_name.startswith(("position_embd.", "rope_freqs."))
    )


def is_output_like(gguf_name: str, tied: bool) -> bool:
    """The output projection (or the token embedding when it doubles as one)."""
    return gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
