"""Packaging: one `edit2deploy` package in the wheel (formats as its subpackages), the console script, and the
layer contracts (`lint-imports`: dependencies point one way)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import edit2deploy


def test_formats_are_subpackages_of_the_repo_folder():
    from edit2deploy import formats

    assert Path(formats.__file__).resolve() == (ROOT / "edit2deploy" / "formats" / "__init__.py").resolve()
    assert set(formats.FORMATS) == {"gguf", "onnx", "bnb"}
    assert Path(edit2deploy.__file__).resolve().parent == (ROOT / "edit2deploy").resolve()


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def test_layers_hold():
    """cli/api -> ops -> methods/formats/report -> core; formats independent; no cycles (pyproject contracts)."""
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contracts can fail: a copy of the package where a core module imports ops is refused."""
    shutil.copytree(
        ROOT / "edit2deploy", tmp_path / "edit2deploy", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    gates = tmp_path / "edit2deploy" / "gates.py"
    gates.write_text(gates.read_text() + "\nfrom .ops import run as _upward  # noqa: E402\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "edit2deploy.gates is not allowed to import edit2deploy.ops" in proc.stdout


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
    shutil.copytree(ROOT / "edit2deploy", src / "edit2deploy", ignore=ignore)
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


def test_wheel_holds_every_subpackage(wheel_names):
    for sub in ("formats", "formats/gguf", "formats/onnx", "formats/bnb", "ops", "cli", "report", "methods"):
        assert f"edit2deploy/{sub}/__init__.py" in wheel_names, sub
    assert "edit2deploy/__init__.py" in wheel_names and "edit2deploy/report_schema.json" in wheel_names
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
