"""bitsandbytes export: a serialized bitsandbytes checkpoint (int8 / nf4 / fp4), and the record's checks.

    bnb = edit2deploy.formats.get_format("bnb")
    art = bnb.export(model_dir, "out/model-bnb-nf4", "nf4")      # load_in_4bit, bnb_4bit_quant_type="nf4"
    art = bnb.export(model_dir, "out/model-bnb-int8", "int8")    # load_in_8bit (LLM.int8)
    scorer = bnb.scorer(art)                                     # edit2deploy.scoring.Scorer (torch + bitsandbytes)

This is the check for users who deploy with `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`:
the export quantizes the (edited) Hugging Face directory with transformers' bitsandbytes integration on the CPU
and writes the quantized model with `save_pretrained` (4-bit weights packed as uint8 plus their
`quant_state.bitsandbytes__nf4` blobs; 8-bit weights as int8 plus the row scales `SCB`), with the tokenizer and a
`config.json` that carries the `quantization_config`. The scorer loads that directory back with plain
`from_pretrained` (no config given: the checkpoint says how it is quantized), exactly as a deployment would, and
scores it with `edit2deploy.scoring.TorchScorer`.

Edited-tensor protection (`ExportPolicy.protect_edits`, default "q8_0"): the modules whose weights the ledger
changed (`read_edit_info(model_dir).edited_tensors`, e.g. `model.layers.4.mlp.down_proj.weight`) are kept out
of quantization with `llm_int8_skip_modules` when the target is below the floor (nf4/fp4 with "q8_0" or "f16";
int8 with "f16"): they stay float, like the LM head. At int8 with "q8_0" they are int8 like the rest (8 bits meet
the floor); "none" quantizes them like the rest. The saved checkpoint is read back and each edited tensor's stored
type ("nf4", "int8", "float32", ...) recorded; an export that broke the floor is not published.

Modules left float are stored in `options.dtype` (float32 by default, so skipped modules keep the edited fp32
weights exactly); 4-bit matmuls compute in `options.compute_dtype` (float32 by default, the CPU's native type).

The record (an `Artifact`) is written inside the output directory as `edit2deploy.json`; the directory is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edit2deploy.atomic import atomic_dir, remove_stale_temps
from edit2deploy.errors import UsageError
from edit2deploy.ledger import read_edit_info

from ...scoring import Scored, TorchScorer
from ..base import RECORD_FILE, Artifact, ExportPolicy
from . import INSTALL_HINT, QUANTS, is_bnb_dir

FORMAT = "bnb"
_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}
_DTYPES = ("float32", "bfloat16", "float16")
# what `save_pretrained` writes that is the model itself; every other top-level file (tokenizer, chat
# template, ...) is copied from the input so the directory is complete on its own
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class BnbOptions:
    """Quantization settings beyond the type (recorded in the artifact; the paired baseline uses the same)."""

    compute_dtype: str = "float32"  # bnb_4bit_compute_dtype: the dtype 4-bit matmuls run in
    dtype: str = "float32"  # the modules left float (embeddings, norms, LM head, protected edits)
    double_quant: bool = False  # bnb_4bit_use_double_quant: quantize the 4-bit absmax scales too
    int8_threshold: float = 6.0  # llm_int8_threshold: LLM.int8's outlier threshold (transformers' default)

    def __post_init__(self) -> None:
        for name in ("compute_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise UsageError(
                    f"bnb option {name}: expected one of {', '.join(_DTYPES)}, got {getattr(self, name)!r}"
                )

    @classmethod
    def coerce(cls, options: BnbOptions | Mapping[str, Any] | None) -> BnbOptions:
        if options is None:
            return cls()
        if isinstance(options, BnbOptions):
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(
                f"bnb options: unknown {', '.join(unknown)} (expected {', '.join(sorted(known))})"
            )
        return cls(**dict(options))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def require_bnb() -> None:
    """A one-line usage error when bitsandbytes is not installed (the format is an optional extra)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"the bnb format needs bitsandbytes, which is not installed ({INSTALL_HINT})")


def _norm_quant(quant: str | None) -> str:
    q = (quant or "").strip().lower()
    aliases = {"8bit": "int8", "llm.int8": "int8", "q8": "int8", "4bit": "nf4", "q4": "nf4"}
    q = aliases.get(q, q)
    if q not in QUANTS:
        raise UsageError(f"--quant {quant}: the bnb format takes one of {', '.join(QUANTS)}")
    return q


def _protect_floor(policy: ExportPolicy, quant: str) -> int | None:
    """The fewest bits an edited weight may keep (None: the target already meets the floor, or no protection)."""
    floor = policy.protect_edits.bits
    return floor if floor and _BITS[quant] < floor else None


def module_of(tensor: str) -> str:
    """`model.layers.4.mlp.down_proj.weight` -> `model.layers.4.mlp.down_proj` (what bitsandbytes replaces)."""
    return tensor.removesuffix(".weight")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable config.json ({exc})") from exc


def _check_io(model_dir: Path, out: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if is_bnb_dir(model_dir):
        raise UsageError(
            f"{model_dir}: already a bitsandbytes checkpoint (expected the float model to quantize)"
        )
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise UsageError(f"{out}: the bnb output must not be inside the input model directory")
    if out.is_file():
        raise UsageError(f"{out}: is a file (expected a directory to write the bitsandbytes checkpoint into)")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise UsageError(f"{out}: exists and is not an edit2deploy bnb export; refusing to replace it")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def quantization_config(quant: str, opts: BnbOptions, skip: Sequence[str] | None):
    """transformers' `BitsAndBytesConfig` for a target (`skip`: modules kept float; None: transformers' default,
    i.e. the LM head)."""
    from transformers import BitsAndBytesConfig

    skip_kw = {} if skip is None else {"llm_int8_skip_modules": list(skip)}
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=opts.int8_threshold, **skip_kw)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_compute_dtype=_torch_dtype(opts.compute_dtype),
        bnb_4bit_use_double_quant=opts.double_quant,
        **skip_kw,
    )


def default_skip_modules(model_dir: Path) -> list[str]:
    """The modules transformers keeps float when no skip list is given (the output head, tied weights).

    Giving `llm_int8_skip_modules` replaces that default, so a protected export names them as well."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # where transformers 5 keeps it; 4.x had it in transformers.integrations
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        from transformers.integrations import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # the module tree only; no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config)
    return sorted(set(get_keys_to_not_convert(model)))


def _quantize_and_save(model_dir: Path, tmp: Path, config, opts: BnbOptions) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map="cpu", dtype=_torch_dtype(opts.dtype)
    )
    model.save_pretrained(tmp)
    del model
    for f in sorted(model_dir.iterdir()):
        if (
            f.is_file()
            and f.name not in _MODEL_FILES
            and f.suffix not in (".safetensors", ".bin", ".pt", ".pth")
        ):
            shutil.copy2(f, tmp / f.name)


def stored_types(path: Path) -> dict[str, str]:
    """Stored type of every weight in a saved checkpoint: "nf4"/"fp4" (packed 4-bit with a quant state),
    "int8" (LLM.int8: int8 rows with their scales `SCB`), else the tensor's dtype ("float32", ...)."""
    from safetensors import safe_open

    dtypes: dict[str, str] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                dtypes[key] = str(st.get_slice(key).get_dtype())
    out: dict[str, str] = {}
    for key, dtype in dtypes.items():
        if not key.endswith(".weight"):
            continue
        module = module_of(key)
        four = [t for t in ("nf4", "fp4") if f"{key}.quant_state.bitsandbytes__{t}" in dtypes]
        if four:
            out[key] = four[0]
        elif f"{module}.SCB" in dtypes and dtype in ("I8", "int8"):
            out[key] = "int8"
        else:
            out[key] = _SAFETENSORS_DTYPES.get(dtype, dtype.lower())
    return out


_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
}


def _record_edited(
    edited: Sequence[str], types: Mapping[str, str], floor: int | None
) -> tuple[dict[str, str], dict[str, str]]:
    """HF name -> checkpoint name and -> stored type for each edited tensor; raises if protection did not hold."""
    names: dict[str, str] = {}
    kinds: dict[str, str] = {}
    problems = []
    for hf in edited:
        stored = types.get(hf)
        names[hf], kinds[hf] = hf, stored or "unknown"
        if stored is None:
            if floor is not None:
                problems.append(f"{hf}: not in the saved checkpoint")
        elif floor is not None and _BITS.get(stored, 0) < floor:
            problems.append(f"{hf}: stored as {stored}, below the protection floor ({floor} bits)")
    if problems:
        raise RuntimeError(
            "bnb export did not protect the edited weights; report this:\n" + "\n".join(problems)
        )
    return names, kinds


def export(
    model_dir: Path | str,
    out: Path | str,
    quant: str | None = "nf4",
    policy: ExportPolicy | str | None = None,
    *,
    options: BnbOptions | Mapping[str, Any] | None = None,
    edited_tensors: Sequence[str] | None = None,
    progress: bool = False,
    **option_kw: Any,
) -> Artifact:
    """Quantize a Hugging Face directory with bitsandbytes and save the checkpoint to `out` (atomically).

    `quant`: int8, nf4, fp4. `options` / keywords: see `BnbOptions`. `edited_tensors`: HF names to protect
    instead of the ledger's (the paired unedited baseline uses the same). `progress` is accepted for symmetry
    with the other formats (loading a checkpoint shows transformers' own bar)."""
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    quant = _norm_quant(quant)
    policy = ExportPolicy.coerce(policy)
    opts = BnbOptions.coerce({**BnbOptions.coerce(options).to_json(), **option_kw} if option_kw else options)
    _check_io(model_dir, out)
    require_bnb()
    edited = list(read_edit_info(model_dir).edited_tensors if edited_tensors is None else edited_tensors)
    floor = _protect_floor(policy, quant)
    protected = sorted({module_of(t) for t in edited}) if floor is not None else []
    skip = sorted(set(default_skip_modules(model_dir)) | set(protected)) if protected else None
    remove_stale_temps(out)
    with atomic_dir(out, replace=True) as tmp:
        _quantize_and_save(model_dir, tmp, quantization_config(quant, opts, skip), opts)
        types = stored_types(tmp)
        edited_names, edited_types = _record_edited(edited, types, floor)
        art = Artifact(
            path=out,
            format=FORMAT,
            quant=quant,
            mode="full",
            model_dir=model_dir,
            protect_edits=policy.protect_edits,
            edited_types=edited_types,
            edited_names=edited_names,
            type_counts=dict(sorted(Counter(types.values()).items())),
            extra={
                "options": opts.to_json(),
                "skip_modules": skip,  # None: transformers' default (the output head)
                "protected_modules": protected,
                "versions": _versions(),
            },
        )
        art.size_bytes = _dir_size(tmp)
        art.seconds = round(time.perf_counter() - t0, 3)
        (tmp / RECORD_FILE).write_text(json.dumps(art.to_json(), indent=1) + "\n")
    return art


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("bitsandbytes", "transformers", "torch")}


def describe(path: Path) -> Artifact:
    """The `Artifact` of a bitsandbytes directory we did not write: what the config and the checkpoint say."""
    qc = read_config(path)["quantization_config"]
    quant = "int8" if qc.get("load_in_8bit") else str(qc.get("bnb_4bit_quant_type", "unknown"))
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        mode="unknown",
        protect_edits="none",
        type_counts=dict(sorted(Counter(stored_types(path).values()).items())),
        size_bytes=_dir_size(path),
        extra={"skip_modules": qc.get("llm_int8_skip_modules")},
    )


def check(artifact: Artifact) -> list[str]:
    """Problems between an artifact record and the checkpoint on disk (empty list: consistent)."""
    problems: list[str] = []
    types = stored_types(Path(artifact.path))
    floor = _protect_floor(ExportPolicy(protect_edits=artifact.protect_edits), artifact.quant)
    for hf, name in artifact.edited_names.items():
        stored = types.get(name)
        if stored is None:
            problems.append(f"{name} ({hf}) is missing from {artifact.path}")
            continue
        if stored != artifact.edited_types.get(hf):
            problems.append(f"{name} is stored as {stored}, the record says {artifact.edited_types.get(hf)}")
        if floor is not None and _BITS.get(stored, 0) < floor:
            problems.append(f"{name} is stored as {stored}, below the protection floor ({floor} bits)")
    return problems


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


class BnbScorer(TorchScorer):
    """`TorchScorer` on a bitsandbytes checkpoint loaded back with `from_pretrained` (as a deployment does)."""

    name = "bitsandbytes"

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        # LLM.int8 casts float32 activations to float16 (documented behaviour); bitsandbytes logs that once per
        # layer and call, which would bury a run's output
        log = logging.getLogger("bitsandbytes.autograd._functions")
        log.addFilter(_quiet_int8_cast)
        try:
            return super().score(pairs)
        finally:
            log.removeFilter(_quiet_int8_cast)

    def close(self) -> None:
        self.model = None  # drop the weights now (a run verifies several targets in a row)


def open_scorer(
    artifact: Artifact, batch_size: int = 32, threads: int | None = None, **kwargs: Any
) -> BnbScorer:
    """A `Scorer` on a bitsandbytes directory: the checkpoint's own quantization_config decides how it loads.
    `threads` is not used: torch computes with the process's own threads, as the fp32 references do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_bnb()
    art = artifact
    path = Path(art.path)
    dtype = (art.extra.get("options") or {}).get("dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=_torch_dtype(dtype), **kwargs)
    return BnbScorer(model.eval(), AutoTokenizer.from_pretrained(path), batch_size=batch_size)


def export_baseline(artifact: Artifact, base_model_dir: Path | str, out: Path | str, **kw: Any) -> Artifact:
    """Export the unedited model exactly as `artifact` was exported (same type, options, policy and protected
    module names), so a comparison isolates the edit from the export."""
    return export(
        base_model_dir,
        out,
        artifact.quant,
        ExportPolicy(protect_edits=artifact.protect_edits),
        options=BnbOptions.coerce(artifact.extra.get("options")),
        edited_tensors=list(artifact.edited_names),
        **kw,
    )
