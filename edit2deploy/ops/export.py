"""Export: one implementation for `edit2deploy export`, the Python API and `run`.

`export` writes one artifact where the user says. `export_target` is `run`'s: it reuses an artifact whose record
names the same target and source weights, and is crash-safe (see its docstring).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import kill_point, remove_path, temp_sibling
from ..errors import Edit2DeployError, UsageError
from ..formats import DEFAULT_PROTECTION, Artifact, Format, Protection, Target, get_format, parse_targets
from ..ledger import read_edit_info
from ..models import resolve_model_dir, source_gguf
from .baseline import load_recorded


def resolve_target(
    target: str | Target | None = None,
    format: str | None = None,
    quant: str | None = None,
    protect_edits: Protection | str | None = None,
    where: str = "export",
) -> tuple[Format, str | None, Protection]:
    """(format, type, protection) from a target string/`Target`, or from `format` and `quant` (a patch export may
    leave the type out)."""
    if target is not None:
        if format is not None or quant is not None:
            raise UsageError(f"{where}: give either a target (FORMAT:TYPE) or a format and a type, not both")
        (t,) = _one(target, protect_edits, where)
        return get_format(t.format), t.quant, t.protection
    if format is None:
        raise UsageError(f"{where}: no format (expected a target such as gguf:Q4_K_M, or a format)")
    fmt = get_format(format)
    protection = Protection.parse(protect_edits or DEFAULT_PROTECTION)
    if quant is None:
        return fmt, None, protection
    (t,) = parse_targets(f"{fmt.name}:{quant}", protection, where)
    return fmt, t.quant, t.protection


def _one(target: str | Target, protect_edits: Protection | str | None, where: str) -> list[Target]:
    targets = parse_targets(target, protect_edits or DEFAULT_PROTECTION, where)
    if len(targets) != 1:
        raise UsageError(f"{where}: one target expected, got {len(targets)}")
    return targets


def patch_base(model_dir: Path, patch: str | Path | None, model: str | Path) -> Path | None:
    """The base .gguf of a patch export; 'auto' is the .gguf the base model was opened from."""
    if patch is None:
        return None
    if str(patch) == "auto":
        base = read_edit_info(model_dir).base_model or str(model)
        found = source_gguf(base)
        if found is None:
            raise UsageError(
                f"--patch auto: the base model '{base}' was not opened from a .gguf; name the file"
            )
        return Path(found)
    if not Path(patch).is_file():
        raise UsageError(f"--patch {patch}: file not found")
    return Path(patch)


def check_export(fmt: Format, art: Artifact) -> Artifact:
    """The format's post-export check: the record must match what is on disk."""
    problems = fmt.check(art)
    if problems:
        raise Edit2DeployError(f"{art.path}: the export does not match its record: " + "; ".join(problems))
    return art


def export(
    model: str | Path,
    out: str | Path,
    target: str | Target | None = None,
    *,
    format: str | None = None,
    quant: str | None = None,
    protect_edits: Protection | str | None = None,
    patch: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Artifact:
    """Write `model` (an edited HF directory, a .gguf or a built-in name) to `out` for one target.

    `target`: FORMAT:TYPE[:PROTECTION] (e.g. "gguf:Q4_K_M"), or `format` and `quant`. `patch`: a base .gguf whose
    other tensors are kept byte-identical (gguf only; 'auto': the .gguf the base model came from). `options`:
    format options (e.g. ONNX `block_size`); one that the format does not take is a usage error.
    """
    fmt, q, protection = resolve_target(target, format, quant, protect_edits)
    model_dir = resolve_model_dir(model)
    base = patch_base(model_dir, patch, model)
    kwargs = fmt.check_options(dict(options or {}))
    if base is not None:
        kwargs = {**kwargs, **fmt.check_options({"patch_base": base}, "--patch")}
    elif q is None:
        raise UsageError(f"export: no type given (one of: {', '.join(fmt.quants)})")
    art = fmt.export(model_dir, out, q, protection, progress=progress, **kwargs)
    return check_export(fmt, art)


def run_marker(target: Target, source_fingerprint: str) -> dict:
    """What a run records in an artifact it exported, to know later whether it can reuse it."""
    return {
        "target": str(target),
        "protect_edits": target.protection.value,
        "source_fingerprint": source_fingerprint,
    }


def reusable_artifact(fmt: Format, path: Path, marker: dict) -> Artifact | None:
    """The artifact at `path` if it exists, is recognised by its format and its record says `marker`."""
    art = load_recorded(fmt, path)
    return art if art is not None and art.extra.get("run") == marker else None


def export_target(
    target: Target, model_dir: Path, out: Path, source_fingerprint: str, progress: bool = False
) -> tuple[Artifact, bool]:
    """Export `model_dir` to `out` for `target`, or reuse what is there; returns (artifact, reused).

    Order (crash safety): delete a stale artifact, then its record; export to a temporary name; write the final
    record and the format's extra files (Modelfile); rename the artifact into place (the commit point).
    """
    fmt = get_format(target.format)
    marker = run_marker(target, source_fingerprint)
    art = reusable_artifact(fmt, out, marker)
    if art is not None:
        return art, True
    remove_path(out)
    remove_path(fmt.record_path(out))
    scratch = temp_sibling(
        out
    )  # a private directory next to `out`: the export is written in it under its name
    scratch.mkdir()
    tmp = scratch / out.name
    try:
        art = fmt.export(model_dir, tmp, target.quant, target.policy, progress=progress, **target.option_dict)
        art.path = tmp
        check_export(fmt, art)
        art.path = out
        art.extra = {**art.extra, "run": marker}
        fmt.write_record(art, at=tmp)
        fmt.after_export(art, model_dir)
        kill_point("export")  # the record is in place, the artifact not yet
        os.replace(tmp, out)  # the commit point
    finally:
        remove_path(scratch)
    return art, False
