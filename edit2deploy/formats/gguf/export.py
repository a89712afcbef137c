"""GGUF export (full or patch) and the checks of a written file.

Full export: `writer` streams the safetensors into a GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 encoded
in numpy). K-quants: a lossless GGUF (F32, or BF16/F16 when every weight is stored so) is written to a temporary
file and `llama_model_quantize` picks the per-tensor mix; edited tensors that ended below the protection floor are then re-encoded from the full-precision weights.

Edited-tensor protection (`ExportPolicy.protect_edits`, default "q8_0"): the tensors the edit ledger changed
(`edit2deploy.ledger.read_edit_info(model_dir).edited_tensors`) are stored at >= Q8_0 (or >= F16) whatever the
target type. The final type of each is in the returned `Artifact` and in the sidecar `<out>.edit2deploy.json`.

Patch mode (`patch_base=`): every other tensor's bytes and all metadata are copied from the base GGUF; the
edited tensors are re-encoded from the model directory at the base's type (raised by protection if below it).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT
from safetensors import safe_open

from edit2deploy.atomic import TEMP_MARK, atomic_path, remove_stale_temps
from edit2deploy.errors import UsageError
from edit2deploy.ledger import read_edit_info

from ..base import Artifact, ExportPolicy, sidecar_path, write_sidecar
from .arch import ModelLayout, is_float_only
from .constants import PROTECT_TYPES, bits_per_weight, protected_type, quant_spec, row_fits
from .patch import GGUFLayout, Replacement, is_gguf, rewrite, scan
from .quant import encode, llama_quantize
from .writer import intermediate_type, safetensors_index, write_gguf

FORMAT = "gguf"


def file_type_name(file_type: int | None) -> str:
    """ "Q4_K_M" for LlamaFileType.MOSTLY_Q4_K_M (the names `--quant` uses)."""
    if file_type is None:
        return "unknown"
    try:
        name = FT(int(file_type)).name
    except ValueError:
        return f"file_type_{file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def tensor_types(path: Path | str) -> dict[str, str]:
    """Every tensor's stored type in a GGUF file (name -> "Q8_0", ...)."""
    return {t.name: t.qtype.name for t in scan(path).tensors}


def edited_tensor_names(model_dir: Path | str, edited: Sequence[str] | None = None) -> dict[str, str]:
    """HF name -> GGUF name of the edited tensors (the ledger's, or `edited`)."""
    layout = ModelLayout.open(model_dir)
    names = read_edit_info(model_dir).edited_tensors if edited is None else list(edited)
    out = {}
    for hf in names:
        g = layout.gguf_name(hf)
        if g is None:
            raise UsageError(f"edited tensor '{hf}' has no place in a GGUF")
        out[hf] = g
    return out


def _scratch(out: Path) -> Path:
    """A hidden temporary file next to `out` (same filesystem), named like `edit2deploy.atomic`'s temps so
    `remove_stale_temps(out)` cleans it up if this process dies; the caller deletes it."""
    return out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _edited_list(model_dir: Path, edited: Sequence[str] | None) -> list[str]:
    return list(read_edit_info(model_dir).edited_tensors if edited is None else edited)


def _replacements(
    layout: ModelLayout,
    edited: Sequence[str],
    base: GGUFLayout,
    protect: str,
    only_raised: bool,
) -> dict[str, Replacement]:
    """Edited tensors re-encoded from the model dir at the base's type (raised to the protection floor)."""
    if not edited:
        return {}
    index = safetensors_index(layout.model_dir)
    by_name = base.by_name
    out: dict[str, Replacement] = {}
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        for hf in edited:
            gname = layout.gguf_name(hf)
            if hf not in index or gname is None:
                raise UsageError(f"{layout.model_dir}: edited tensor '{hf}' not found in the weights")
            entry = by_name.get(gname)
            if entry is None:
                raise UsageError(f"{base.path}: has no tensor '{gname}' (edited '{hf}'): not the same model?")
            qtype = entry.qtype
            if not is_float_only(gname, len(entry.shape)):
                qtype = protected_type(entry.qtype, protect)
                if not row_fits(qtype, entry.shape):
                    qtype = QT.F16
            if only_raised and qtype == entry.qtype:
                continue
            src = index[hf]
            if src not in handles:
                handles[src] = stack.enter_context(safe_open(src, "pt"))
            data = layout.transform(hf, handles[src].get_tensor(hf), n_vocab=entry.shape[0]).numpy()
            if tuple(data.shape) != entry.shape:
                raise UsageError(
                    f"{base.path}: tensor '{gname}' has shape {entry.shape}, the model's '{hf}' gives {data.shape}"
                )
            out[gname] = Replacement(encode(data, qtype), qtype)
    return out


def _artifact(
    path: Path,
    quant: str,
    mode: str,
    model_dir: Path,
    policy: ExportPolicy,
    names: dict[str, str],
    types: dict[str, QT],
    seconds: float,
    base: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Artifact:
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        mode=mode,
        model_dir=model_dir,
        base=base,
        protect_edits=policy.protect_edits,
        edited_types={hf: types[g].name for hf, g in names.items()},
        edited_names=dict(names),
        type_counts=dict(sorted(Counter(t.name for t in types.values()).items())),
        size_bytes=path.stat().st_size,
        seconds=round(seconds, 3),
        extra=extra or {},
    )


def export(
    model_dir: Path | str,
    out: Path | str,
    quant: str | None = "Q8_0",
    policy: ExportPolicy | str | None = None,
    patch_base: Path | str | None = None,
    *,
    edited_tensors: Sequence[str] | None = None,
    threads: int | None = None,
    progress: bool = False,
    tokenizer_pre: str | None = None,
) -> Artifact:
    """Export a Hugging Face directory to a GGUF file (atomically) and write its sidecar record.

    `quant`: a name from `QUANTS` (case-insensitive). In patch mode it may be None (keep the base's types);
    if given it must name the base's file type. `edited_tensors`: HF names to protect/replace instead of the
    ledger's (e.g. the same names when exporting a paired unedited baseline). `tokenizer_pre`: llama.cpp
    pre-tokenizer name for a tokenizer llama.cpp's table does not recognise.
    """
    model_dir = Path(model_dir)
    out = Path(out)
    policy = ExportPolicy.coerce(policy)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory (expected the .gguf file to write)")
    edited = _edited_list(model_dir, edited_tensors)
    layout = ModelLayout.open(model_dir)
    remove_stale_temps(out)  # leftovers of an export that was killed
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(out).unlink()  # never leave a stale record next to a new file
    if patch_base is not None:
        return _patch(layout, out, quant, policy, Path(patch_base), edited)
    if quant is None:
        raise UsageError("--quant is required for a full GGUF export (patch mode keeps the base's types)")
    spec = quant_spec(quant)
    t0 = time.perf_counter()
    notes: list[str] = []
    with atomic_path(out) as tmp:
        if spec.backend == "numpy":
            assert spec.tensor_type is not None
            res = write_gguf(
                model_dir,
                tmp,
                spec.tensor_type,
                spec.file_type,
                edited,
                policy.protect_edits,
                progress,
                tokenizer_pre,
            )
            types = res.types
        else:
            lossless, quantized = _scratch(out), _scratch(out)
            try:
                inter, inter_ft = intermediate_type(model_dir)
                res = write_gguf(
                    model_dir, lossless, inter, inter_ft, progress=progress, tokenizer_pre=tokenizer_pre
                )
                protect = bool(edited) and PROTECT_TYPES[policy.protect_edits] is not None
                log = llama_quantize(lossless, quantized if protect else tmp, spec.file_type, threads)
                notes = [line.strip() for line in log if "fallback" in line and "WARNING" in line]
                lossless.unlink()
                if protect:
                    base = scan(quantized)
                    types = rewrite(
                        base, tmp, _replacements(layout, edited, base, policy.protect_edits, True)
                    )
                else:
                    types = {t.name: t.qtype for t in scan(tmp).tensors}
            finally:
                for p in (lossless, quantized):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
    names = {hf: res.names[hf] for hf in edited}
    extra: dict[str, Any] = {
        "tokenizer": {"model": res.vocab.model, "pre": res.vocab.pre, "add_bos": res.vocab.add_bos}
    }
    if spec.backend == "llama.cpp" and notes:
        extra["llama_quantize"] = notes
    art = _artifact(
        out, spec.name, "full", model_dir, policy, names, types, time.perf_counter() - t0, extra=extra
    )
    write_sidecar(art)
    return art


def _patch(
    layout: ModelLayout,
    out: Path,
    quant: str | None,
    policy: ExportPolicy,
    base_path: Path,
    edited: list[str],
) -> Artifact:
    t0 = time.perf_counter()
    if not is_gguf(base_path):
        raise UsageError(f"{base_path}: patch base is not a GGUF file")
    base = scan(base_path)
    base_arch = base.values.get("general.architecture")
    if base_arch != layout.arch_name:
        raise UsageError(f"{base_path}: is a '{base_arch}' GGUF, the model is '{layout.arch_name}'")
    base_quant = file_type_name(base.values.get("general.file_type"))
    if quant is not None and quant.strip().upper() not in ("AUTO", "BASE", base_quant):
        raise UsageError(
            f"--quant {quant}: patch mode keeps the base's types ({base_quant}); leave --quant out or use a full export"
        )
    if not edited:
        raise UsageError(
            f"{layout.model_dir}: no edited tensors (the edit ledger is empty): nothing to patch"
        )
    reps = _replacements(layout, edited, base, policy.protect_edits, only_raised=False)
    with atomic_path(out) as tmp:
        types = rewrite(base, tmp, reps)
    names = {hf: layout.gguf_name(hf) or "" for hf in edited}
    art = _artifact(
        out, base_quant, "patch", layout.model_dir, policy, names, types, time.perf_counter() - t0, base_path
    )
    write_sidecar(art)
    return art


def open_scorer(artifact: Artifact, threads: int | None = None, **kwargs: Any):
    """The artifact in llama.cpp (`LlamaCppScorer`: scores, greedy continuations, chat); `threads` None:
    `threads.shared_threads()`."""
    from .scorer import LlamaCppScorer

    return LlamaCppScorer(artifact.path, n_threads=threads, **kwargs)


def describe(path: Path) -> Artifact:
    """The `Artifact` of a GGUF we did not write: what the file itself says."""
    layout = scan(path)
    counts = Counter(t.qtype.name for t in layout.tensors)
    return Artifact(
        path=path,
        format=FORMAT,
        quant=file_type_name(layout.values.get("general.file_type")),
        mode="unknown",
        protect_edits="none",
        type_counts=dict(sorted(counts.items())),
        size_bytes=path.stat().st_size,
    )


def check(artifact: Artifact) -> list[str]:
    """Problems between an artifact record and the file on disk (empty list: consistent).

    Checks that every edited tensor is present at the recorded type and not below the protection floor.
    """
    problems: list[str] = []
    on_disk = tensor_types(artifact.path)
    floor = PROTECT_TYPES.get(artifact.protect_edits)
    for hf, gname in artifact.edited_names.items():
        stored = on_disk.get(gname)
        if stored is None:
            problems.append(f"{gname} ({hf}) is missing from {artifact.path}")
            continue
        if stored != artifact.edited_types.get(hf):
            problems.append(f"{gname} is stored as {stored}, the record says {artifact.edited_types.get(hf)}")
        qt = QT[stored]
        if floor is not None and not is_float_only(gname, 2) and bits_per_weight(qt) < bits_per_weight(floor):
            problems.append(f"{gname} is stored as {stored}, below the protection floor {floor.name}")
    return problems


def export_baseline(
    artifact: Artifact, base_model_dir: Path | str, out: Path | str, *, threads: int | None = None
) -> Artifact:
    """Export the unedited model exactly as `artifact` was exported (same type, policy, protected tensor
    names, patch base), so a comparison isolates the edit from the export."""
    policy = ExportPolicy(protect_edits=artifact.protect_edits)
    return export(
        base_model_dir,
        out,
        None if artifact.mode == "patch" else artifact.quant,
        policy,
        patch_base=artifact.base if artifact.mode == "patch" else None,
        edited_tensors=list(artifact.edited_names),
        threads=threads,
    )


def same_tensor_bytes(a: Path | str, b: Path | str, names: Sequence[str]) -> dict[str, bool]:
    """For each tensor name: whether its bytes are identical in two GGUF files (tests and reports)."""
    la, lb = scan(a), scan(b)
    ta, tb = la.by_name, lb.by_name
    out = {}
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for n in names:
            ea, eb = ta[n], tb[n]
            fa.seek(la.data_start + ea.offset)
            fb.seek(lb.data_start + eb.offset)
            out[n] = ea.qtype == eb.qtype and np.array_equal(
                np.frombuffer(fa.read(ea.n_bytes), np.uint8), np.frombuffer(fb.read(eb.n_bytes), np.uint8)
            )
    return out
