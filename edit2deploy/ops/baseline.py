"""The paired baseline: the unedited model exported exactly as an artifact was, cached under the user cache dir.

Comparing an artifact with its paired baseline separates what the export does to any model from what it does to
the edits. `verify`, `run` and the Python API all get it here, with one caching rule: a cached baseline is reused
when its format recognises it and its record is there; otherwise it is exported again.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_file, kill_point, remove_path
from ..formats import Artifact, Format
from ..models import cache_root, file_sha256


def baseline_path(artifact: Artifact, base_fingerprint: str) -> Path:
    """Where the paired baseline of an artifact is cached (keyed by everything that shapes the export)."""
    key = json.dumps(
        {
            "base": base_fingerprint,
            "format": artifact.format,
            "quant": artifact.quant,
            "mode": artifact.mode,
            "protect": artifact.protect_edits,
            "edited": sorted(artifact.edited_names),
            "patch": None if artifact.base is None else [str(artifact.base), artifact.base.stat().st_size],
            "options": {k: artifact.extra.get(k) for k in ("options", "execution_provider", "backend")},
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "baselines" / f"{artifact.format}-{artifact.quant}-{digest}" / artifact.path.name


def load_recorded(fmt: Format, path: Path) -> Artifact | None:
    """The record of the artifact at `path`, or None when it is missing, unreadable, not this format's, or was
    not written by us (a file renamed into place by an export killed before its record was written)."""
    if not path.exists():
        return None
    try:
        if not fmt.detect(path):
            return None
        return fmt.read_record(path)
    except Exception:  # noqa: BLE001 - a damaged or half-written artifact, whatever the format raises: redo it
        return None


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def tree_sha256(path: Path) -> str:
    """SHA-256 over an artifact's bytes: a file, or every file of a directory (names and bytes, in name order)."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _cached_baseline(fmt: Format, path: Path) -> Artifact | None:
    """A cached baseline whose bytes are the ones recorded when it was exported; a damaged one warns (None)."""
    if not path.exists():
        return None
    cached = load_recorded(fmt, path)
    problem = None if cached is not None else "unreadable or without its record"
    checksum = _checksum_file(path)
    if cached is not None and checksum.is_file() and checksum.read_text().strip() != tree_sha256(path):
        problem = "its SHA-256 changed"
    if problem is not None:
        warnings.warn(
            f"paired baseline cache {path} is corrupt ({problem}); exporting it again", stacklevel=3
        )
        return None
    if not checksum.is_file():  # written by a version without checksums, or killed before writing it
        with atomic_file(checksum, "w") as fh:
            fh.write(tree_sha256(path) + "\n")
    return cached


def paired_baseline(
    fmt: Format,
    art: Artifact,
    base_model_dir: Path,
    base_fingerprint: str,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[Artifact, bool]:
    """The unedited model exported like `art`; returns (baseline, reused)."""
    path = baseline_path(art, base_fingerprint)
    cached = _cached_baseline(fmt, path)
    if cached is not None:
        return cached, True
    remove_path(path)
    remove_path(_checksum_file(path))
    kill_point("baseline")
    log(f"paired baseline {art.format}:{art.quant}: exporting the unedited model -> {path}")
    baseline = fmt.paired_baseline(art, base_model_dir, path)
    with atomic_file(_checksum_file(path), "w") as fh:
        fh.write(tree_sha256(path) + "\n")
    return baseline, False
