"""The paired baseline: the unedited model exported exactly as an artifact was, cached under the user cache dir.

Comparing an artifact with its paired baseline separates what the export does to any model from what it does to
the edits. `verify`, `run` and the Python API all get it here, with one caching rule: a cached baseline is reused
when its format recognises it and its record is there; otherwise it is exported again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ..atomic import remove_path
from ..formats import Artifact, Format
from ..models import cache_root


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


def paired_baseline(
    fmt: Format,
    art: Artifact,
    base_model_dir: Path,
    base_fingerprint: str,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[Artifact, bool]:
    """The unedited model exported like `art`; returns (baseline, reused)."""
    path = baseline_path(art, base_fingerprint)
    cached = load_recorded(fmt, path)
    if cached is not None:
        return cached, True
    remove_path(path)
    log(f"paired baseline {art.format}:{art.quant}: exporting the unedited model -> {path}")
    return fmt.paired_baseline(art, base_model_dir, path), False
