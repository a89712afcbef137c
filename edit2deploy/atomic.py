"""Write-then-rename helpers: an output appears under its final name only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(final: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; rename it to `final` if the block succeeds.

    With `replace=True` an existing `final` is swapped out (moved aside, then deleted) only after
    the new one is complete, so a crash never leaves neither.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = _temp_sibling(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path | str, mode: str = "wb") -> Iterator:
    """Open a temporary file next to `final` for writing; fsync and rename it over `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_path(final: Path | str) -> contextlib.AbstractContextManager[Path]:
    """Like `atomic_file` but yields a path, for writers that open the file themselves."""
    return _atomic_path(Path(final))


@contextlib.contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
