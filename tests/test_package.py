"""Packaging: `exporters/` installs as `edit2deploy.exporters`, never as a top-level `exporters`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import edit2deploy


def test_exporters_subpackage_comes_from_the_repo_folder():
    from edit2deploy import exporters

    assert Path(exporters.__file__).resolve() == (ROOT / "exporters" / "__init__.py").resolve()
    assert exporters.__name__ == "edit2deploy.exporters"
    assert Path(edit2deploy.__file__).resolve().parent == (ROOT / "edit2deploy").resolve()


def test_version_matches_pyproject():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert edit2deploy.__version__ == meta["project"]["version"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build a real (non-editable) wheel from a copy of the sources and list its files."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("edit2deploy", "exporters"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("edit2deploy-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel_names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_holds_exporters_inside_the_package(wheel_names):
    assert "edit2deploy/exporters/__init__.py" in wheel_names
    assert "edit2deploy/__init__.py" in wheel_names and "edit2deploy/cli.py" in wheel_names
    top_level = {n.split("/", 1)[0] for n in wheel_names}
    assert "exporters" not in top_level
    assert "tests" not in top_level
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"edit2deploy"}


def test_wheel_declares_the_console_script(wheel, wheel_names):
    (entry,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(entry).decode()
    assert "[console_scripts]" in text
    assert "edit2deploy = edit2deploy.cli:main" in text
