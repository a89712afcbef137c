"""Write-then-rename: an output appears under its final name only when complete; failures leave no debris."""

from __future__ import annotations

import os

import pytest

from edit2deploy import atomic
from edit2deploy.atomic import atomic_dir, atomic_file, atomic_path, remove_stale_temps


def names(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out" / "model"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        (tmp / "a.txt").write_text("a")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "a"
    assert names(final.parent) == ["model"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("boom")
    assert names(tmp_path) == []


def test_atomic_dir_refuses_to_overwrite_unless_asked(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(final) == ["old.txt"] and names(tmp_path) == ["model"]
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(final) == ["new.txt"] and names(tmp_path) == ["model"]


def test_failed_swap_puts_the_old_dir_back(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_rename = os.rename
    new_dir = {}

    def flaky(src, dst):
        if str(src) == str(new_dir.get("tmp")) and str(dst) == str(final) and not flaky.failed:
            flaky.failed = True  # renaming the new dir into place fails once
            raise OSError("disk on fire")
        return real_rename(src, dst)

    flaky.failed = False
    monkeypatch.setattr(atomic.os, "rename", flaky)
    with pytest.raises(OSError, match="disk on fire"), atomic_dir(final, replace=True) as tmp:
        new_dir["tmp"] = tmp
        (tmp / "new.txt").write_text("new")
    assert flaky.failed
    assert names(final) == ["old.txt"]  # the complete old output survives
    assert names(tmp_path) == ["model"]  # and nothing else is left around


def test_atomic_file_and_path(tmp_path):
    final = tmp_path / "report.json"
    with atomic_file(final, "w") as fh:
        fh.write("{}")
        assert not final.exists()
    assert final.read_text() == "{}"
    with pytest.raises(ValueError), atomic_file(final, "w") as fh:
        fh.write("partial")
        raise ValueError
    assert final.read_text() == "{}" and names(tmp_path) == ["report.json"]
    with atomic_path(tmp_path / "x.bin") as p:
        p.write_bytes(b"x")
    assert (tmp_path / "x.bin").read_bytes() == b"x"
    with pytest.raises(KeyError), atomic_path(tmp_path / "y.bin") as p:
        p.write_bytes(b"y")
        raise KeyError
    assert names(tmp_path) == ["report.json", "x.bin"]


def test_remove_stale_temps(tmp_path):
    final = tmp_path / "model"
    dead_dir = tmp_path / f".model.tmp-{2**31 - 7}-aaaaaaaa"
    dead_file = tmp_path / f".model.tmp-{2**31 - 7}-bbbbbbbb"
    live = tmp_path / f".model.tmp-{os.getpid()}-cccccccc"
    other = tmp_path / f".other.tmp-{2**31 - 7}-dddddddd"  # belongs to another output
    dead_dir.mkdir()
    (dead_dir / "f").write_text("x")
    dead_file.write_text("x")
    live.mkdir()
    other.mkdir()
    removed = remove_stale_temps(final)
    assert sorted(removed) == sorted([dead_dir, dead_file])
    assert names(tmp_path) == sorted([live.name, other.name])
    assert remove_stale_temps(tmp_path / "missing" / "model") == []
