"""kill -9 at every stage (issue 31): `edit2deploy run` on a tiny random model, SIGKILLed where each stage starts
(EDIT2DEPLOY_TEST_KILL_AT, the test hook `atomic.kill_point`). After each kill: every file under a final name matches
its record, the input model is byte-identical, and the same command run again completes and passes. The same for
`edit` into an already edited model: the kill leaves the input and its ledger alone, the rerun's ledger describes its
weights, and `rollback` of the new batch gives back the input's weights bit for bit.

A tiny llama (hidden 64), two edits, two z-optimisation steps, one gguf:Q8_0 target, no generation probes: the
smallest run that passes every stage.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import run_cli, tree_digest

from edit2deploy.atomic import KILL_ENV, KILL_STAGES, TEMP_MARK
from edit2deploy.formats import FORMATS
from edit2deploy.ledger import Ledger, rollback, tensor_sha256
from edit2deploy.models import weights_fingerprint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)

EDITS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "ice hockey"},
]
MORE = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}]
TOML = "[edit]\nlayers = [0, 1]\nmax_steps = 2\n"
RUN_STAGES = KILL_STAGES  # statistics, z-optimisation, solve, ledger, export, baseline, verify, report
EDIT_STAGES = ("statistics", "z-optimisation", "solve", "ledger")


@pytest.fixture(scope="module")
def kenv(tmp_path_factory, tiny_model_dir):
    from edit2deploy.ops.scores import load_heldout

    root = tmp_path_factory.mktemp("kill")
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EDITS))
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MORE))
    (root / "edit.toml").write_text(TOML)
    (root / "corpus.txt").write_text("\n\n".join(p + c for p, c in load_heldout().pairs) * 4)
    return {"root": root, "model": tiny_model_dir("llama")}


def _run_args(kenv, out: Path) -> list[str]:
    r = kenv["root"]
    return [
        "run",
        "--model",
        str(kenv["model"]),
        "--edits",
        str(r / "edits.jsonl"),
        "--targets",
        "gguf:Q8_0",
        "--out",
        str(out),
        "--config",
        str(r / "edit.toml"),
        "--corpus",
        str(r / "corpus.txt"),
        "--n-tokens",
        "400",
        "--gate",
        "survival=0",
        "--gate",
        "specificity_drop=off",  # random weights: the plumbing is under test, not the quality
        "--no-generation",
        "--quiet",
    ]


def _cli(args: list[str], cache: Path, kill: str | None = None):
    env = {"EDIT2DEPLOY_CACHE": str(cache), "TQDM_DISABLE": "1", KILL_ENV: kill or ""}
    return run_cli(*args, env=env, timeout=300)


def model_problems(model: Path) -> list[str]:
    """An edited model directory under its final name must be whole: its ledger describes its weights."""
    if not model.exists():
        return []
    for need in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model / need).is_file():
            return [f"{model.name}/ lacks {need}"]
    ledger = Ledger.load(model)
    if ledger is None:
        return [f"{model.name}/ has no ledger"]
    problem = ledger.weights_problem(model)
    return [problem] if problem else []


def run_problems(out: Path, cache: Path, complete: bool = False) -> list[str]:
    """Files under final names that do not match their records (temporaries are allowed: the next run deletes
    them). `complete`: after a run that finished, each artifact was also exported from the weights in model/ (a
    killed run may leave the previous run's artifact, matching its record, which the next run replaces)."""
    problems = model_problems(out / "model")
    arts = out / "artifacts"
    for a in sorted(arts.iterdir()) if arts.is_dir() else []:
        if TEMP_MARK in a.name:
            continue
        if a.name.endswith(".edit2deploy.json"):
            json.loads(a.read_text())  # a record may precede its artifact, but it is whole
        elif a.suffix == ".gguf":
            art = FORMATS["gguf"].read_record(a)
            if art is None:
                problems.append(f"{a.name} has no record")
                continue
            problems += FORMATS["gguf"].check(art)
            if art.size_bytes != a.stat().st_size:
                problems.append(f"{a.name}: {a.stat().st_size} bytes, its record says {art.size_bytes}")
            if complete and art.extra["run"]["source_fingerprint"] != weights_fingerprint(out / "model"):
                problems.append(f"{a.name} was not exported from the weights in model/")
        elif a.suffix != ".Modelfile":
            problems.append(f"unexpected artifacts/{a.name}")
    for report in out.glob("report.json"):
        json.loads(report.read_text())
    for b in sorted((cache / "baselines").rglob("*.gguf")) if (cache / "baselines").is_dir() else []:
        if TEMP_MARK in b.name:
            continue
        art = FORMATS["gguf"].read_record(b)
        if art is None or FORMATS["gguf"].check(art):
            problems.append(f"baseline {b.name} does not match its record")
    return problems


@pytest.fixture(scope="module")
def complete(kenv, tmp_path_factory):
    """One complete run (its output and cache are copied by each case, which removes what its stage makes)."""
    root = tmp_path_factory.mktemp("kill-complete")
    out, cache = root / "run", root / "cache"
    assert _rerun(_run_args(kenv, out), cache) == 0
    return {"out": out, "cache": cache}


def _rerun(args: list[str], cache: Path) -> int:
    """The same command again, in process (the kill needs a process of its own; the rerun only its exit code)."""
    from edit2deploy import cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDIT2DEPLOY_CACHE", str(cache))
        mp.setenv("TQDM_DISABLE", "1")
        mp.delenv(KILL_ENV, raising=False)
        return cli.main(args)


# what a case removes from the complete run so that its stage runs again
REDO = {
    "statistics": "out/model",  # the kill point is where statistics are read or computed, cached or not
    "z-optimisation": "out/model",
    "solve": "out/model",
    "ledger": "out/model",
    "export": "out/artifacts",
    "baseline": "cache/baselines",
    "verify": None,
    "report": None,
}


@pytest.mark.parametrize("stage", RUN_STAGES)
def test_run_killed_at_each_stage_then_rerun_passes(stage, kenv, complete, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(complete["out"], out)
    shutil.copytree(complete["cache"], cache)
    if REDO[stage]:
        shutil.rmtree(tmp_path / REDO[stage])
    args = _run_args(kenv, out)
    before = tree_digest(kenv["model"])
    t = time.perf_counter()
    killed = _cli(args, cache, kill=stage)
    t_kill = time.perf_counter() - t
    assert killed.returncode == -signal.SIGKILL, (
        f"not killed at {stage}: rc {killed.returncode}\n{killed.stderr[-2000:]}"
    )
    assert run_problems(out, cache) == [], stage
    assert tree_digest(kenv["model"]) == before
    t = time.perf_counter()
    assert _rerun(args, cache) == 0, f"rerun after a kill at {stage}"
    t_again = time.perf_counter() - t
    assert run_problems(out, cache, complete=True) == []
    assert json.loads((out / "report.json").read_text())["passed"] is True
    assert not [p.name for d in (out, out / "artifacts") for p in d.iterdir() if TEMP_MARK in p.name]
    assert tree_digest(kenv["model"]) == before
    print(f"{stage}: killed after {t_kill:.1f} s, rerun {t_again:.1f} s")


@pytest.fixture(scope="module")
def edited(kenv, tmp_path_factory):
    """The tiny model edited once (by the CLI), with its statistics cache."""
    root = tmp_path_factory.mktemp("kill-edit")
    cache, out = root / "cache", root / "edited"
    r = kenv["root"]
    args = ["edit", "--model", str(kenv["model"]), "--edits", str(r / "edits.jsonl"), "--out", str(out)]
    args += [
        "--config",
        str(r / "edit.toml"),
        "--corpus",
        str(r / "corpus.txt"),
        "--n-tokens",
        "400",
        "--quiet",
    ]
    res = _cli(args, cache)
    assert res.returncode == 0, res.stderr[-2000:]
    return {"dir": out, "cache": cache}


def _weights(model: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: tensor_sha256(v) for k, v in load_file(model / "model.safetensors").items()}


@pytest.mark.parametrize("stage", EDIT_STAGES)
def test_edit_into_an_edited_model_killed_then_rerun_and_rollback(stage, kenv, edited, tmp_path):
    src = edited["dir"]
    before = tree_digest(src)
    out = tmp_path / "edited-twice"
    args = ["edit", "--model", str(src), "--edits", str(kenv["root"] / "more.jsonl"), "--out", str(out)]
    args += ["--quiet"]
    killed = _cli(args, edited["cache"], kill=stage)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {stage}: {killed.stderr[-2000:]}"
    assert not out.exists()  # appears only when complete
    assert tree_digest(src) == before and model_problems(src) == []
    assert _rerun(args, edited["cache"]) == 0
    assert not [
        p.name for p in tmp_path.iterdir() if TEMP_MARK in p.name
    ]  # the killed run's temporary is gone
    assert model_problems(out) == []
    ledger = Ledger.load(out)
    assert len(ledger.active_batches) == len(Ledger.load(src).active_batches) + 1
    undone = tmp_path / "undone"
    rollback(out, last=1, out=undone)
    assert _weights(undone) == _weights(src)  # bit for bit
    assert tree_digest(src) == before
