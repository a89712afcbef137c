"""Write-then-rename helpers: an output appears under its final name only when complete."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".tmp-"
KILL_ENV = "EDIT2DEPLOY_TEST_KILL_AT"
KILL_STAGES = (
    "statistics",
    "z-optimisation",
    "solve",
    "ledger",
    "export",
    "baseline",
    "verify",
    "report",
)


def kill_point(stage: str) -> None:
    """Test hook (tests/test_kill.py): the process SIGKILLs itself here when EDIT2DEPLOY_TEST_KILL_AT names
    `stage`, so a crash lands at a known point of a run; without the variable it does nothing."""
    if os.environ.get(KILL_ENV) == stage:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def temp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False  # no such process (or not a possible pid)
    except PermissionError:
        return True  # exists, owned by someone else
    return pid > 0


def remove_stale_temps(final: Path | str) -> list[Path]:
    """Delete temp siblings of `final` left by processes that died mid-write; return what was removed.

    Temps of live processes (another run writing the same output right now) are left alone.
    """
    final = Path(final)
    removed = []
    prefix = f".{final.name}{TEMP_MARK}"
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        remove_path(p)
        removed.append(p)
    return removed


def clean_stale_temps(directory: Path) -> list[Path]:
    """Delete temporaries (".<name>.tmp-<pid>-..."; nested ones too) left in `directory` by dead processes."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not p.name.startswith(".") or TEMP_MARK not in p.name:
            continue
        pids = [int(m) for m in re.findall(re.escape(TEMP_MARK) + r"(\d+)-", p.name)]
        if not pids or any(_pid_alive(pid) for pid in pids):
            continue
        remove_path(p)
        removed.append(p)
    return removed


def remove_path(p: Path) -> None:
    """Delete a file or directory tree (a link is removed, not followed); missing is fine."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; rename it to `final` if the block succeeds.

    With `replace=True` an existing `final` is moved aside, the new one renamed in, and the old one
    deleted; if renaming the new one in fails, the old one is put back. A failed block leaves
    `final` untouched and removes the temporary directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if final.exists() or final.is_symlink():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = temp_sibling(final)
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(old, final)
                raise
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
    tmp = temp_sibling(final)
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
    tmp = temp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
