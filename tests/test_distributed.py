"""Key statistics across processes: `torchrun --nproc-per-node 2 -m edit2deploy stats` shards the corpus, sums the
float64 moments over the ranks and caches the same C (to float64 rounding) and token counts as one process; rank 0
alone prints. Both a text corpus and the generated one (sampled on rank 0, broadcast) are compared.

Edits across processes: `torchrun --nproc-per-node 2 -m edit2deploy edit` shares a batch's z-optimisation between
the ranks, solves on rank 0 and writes the same edited weights (to float rounding) and ledger as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

TORCHRUN = Path(sys.executable).with_name("torchrun")

# Varied paragraphs so the corpus is an odd number of chunks of unequal lengths: the ranks get unequal shards.
PARAGRAPHS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.",
    "Locally nicknamed the Iron Lady, it was constructed from 1887 to 1889 as the centerpiece of the fair.",
    "The tower is 330 metres tall, about the same height as an 81-storey building, and the tallest structure.",
    "Danielle Darrieux was a French actress of stage, television and film, as well as a singer and dancer.",
    "Toko Yasuda is a musician who plays the guitar and keyboards in several bands based in New York.",
    "The Louvre, in Paris, is the most visited museum in the world and a historic landmark of the city.",
]
# text: about 17 of the corpus's 21 chunks, the last one cut; generated: 2 chunks (one per rank)
N_TOKENS = 400


def _start(argv: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", EDIT2DEPLOY_CACHE=str(cache), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # torchrun's agent takes its workers down with it
        out, err = proc.communicate()
        err += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cached(cache: Path) -> dict[str, tuple[torch.Tensor, int]]:
    """Every cached C under the cache's stats/ dir, by file name: (C, token count)."""
    out = {}
    for f in sorted((cache / "stats").rglob("*.safetensors")):
        meta = json.loads(f.with_suffix(".json").read_text())
        out[f.name] = (load_file(f)["C"], int(meta["n_tokens"]))
    return out


def _names(cache: Path) -> dict[str, list[str]]:
    return {f.name: json.loads(f.read_text())["names"] for f in (cache / "stats").rglob("names-*.json")}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same `stats` command under torchrun (2 processes, `--standalone`: a free port of its own) and in one
    process (this one: `cli.main`), each with its own cache, for a text corpus and for the generated one. The two
    torchrun runs go at once: most of each is interpreter start-up and waiting."""
    from edit2deploy import cli

    if not TORCHRUN.is_file():
        pytest.skip(f"no torchrun next to {sys.executable}")
    model = tiny_model_dir("llama")
    tmp = tmp_path_factory.mktemp("distributed")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(PARAGRAPHS * 3) + "\n")
    torchrun = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "edit2deploy"]
    base = ["stats", "--model", str(model), "--layers", "0,1", "--n-tokens", str(N_TOKENS), "--quiet"]
    commands = {"text": [*base, "--corpus", str(corpus)], "generated": base}
    started = {name: _start([*torchrun, *args], tmp / f"{name}-two") for name, args in commands.items()}
    out: dict[str, dict] = {}
    for name, args in commands.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EDIT2DEPLOY_CACHE", str(tmp / f"{name}-one"))
            mp.setenv("TQDM_DISABLE", "1")  # --quiet sets it; restored for the tests that follow
            rc = cli.main(args)
        out[name] = {"one": (subprocess.CompletedProcess(args, rc, "", ""), tmp / f"{name}-one")}
    for name, proc in started.items():
        out[name]["two"] = (_finish(proc, timeout=240), tmp / f"{name}-two")
    return out


@pytest.mark.parametrize("corpus", ["text", "generated"])
def test_two_processes_cache_the_same_statistics_as_one(runs, corpus):
    (two, two_cache), (one, one_cache) = runs[corpus]["two"], runs[corpus]["one"]
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    a, b = _cached(two_cache), _cached(one_cache)
    assert sorted(a) == sorted(b) and len(a) == 2  # layers 0 and 1, the same cache keys
    worst = 0.0
    for name, (C2, n2) in a.items():
        C1, n1 = b[name]
        assert n2 == n1 == N_TOKENS, (name, n2, n1)
        assert C2.dtype == C1.dtype == torch.float64 and C2.shape == C1.shape == (128, 128)
        assert torch.allclose(C2, C1, rtol=1e-10, atol=1e-12), name
        worst = max(worst, (C2 - C1).abs().max().item())
    print(f"\n{corpus} corpus: max |C(2 processes) - C(1 process)| = {worst:.3g}")
    assert _names(two_cache) == _names(one_cache) and len(_names(one_cache)) == 1  # written once, same names
    assert not [p for p in (two_cache / "stats").rglob("*") if ".tmp-" in p.name]


def test_torchrun_prints_its_summary_once(runs):
    two, _ = runs["text"]["two"]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("statistics for layers [0, 1] ready") == 1, two.stdout
    assert "2 processes" in two.stdout
    assert two.stdout.count("tokens") == 1  # one table header
    assert "edit2deploy: error" not in two.stderr and "Traceback" not in two.stderr


def test_other_commands_refuse_to_run_as_several_processes(monkeypatch, capsys, tmp_path):
    from edit2deploy import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    rc = cli.main(["facts", "--model", str(tmp_path / "nowhere"), "--facts", str(tmp_path / "f.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "only `stats` and `edit` run across processes" in err, err


# ================================================================ edit
# Four requests in one batch: each rank optimises two (0, 2 and 1, 3), so a rank that kept only its own values,
# or put the other rank's in the wrong columns, would solve for different targets.
EDITS = [
    {
        "id": "eiffel",
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
    },
    {
        "id": "darrieux",
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
    },
    {"id": "messi", "prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "ice hockey"},
    {
        "id": "yasuda",
        "prompt": "{} plays the instrument",
        "subject": "Toko Yasuda",
        "target_new": "the violin",
    },
]
EDITED = [f"model.layers.{li}.mlp.down_proj.weight" for li in (0, 1)]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def edits(tiny_model_dir, tmp_path_factory):
    """The same `edit` (4 requests, one batch, 3 z-optimisation steps, one retry round) under torchrun (2
    processes) and in one process (this one, while the other runs), each with its own statistics cache."""
    from edit2deploy import cli

    if not TORCHRUN.is_file():
        pytest.skip(f"no torchrun next to {sys.executable}")
    model = tiny_model_dir("llama", layers=4)  # blocks above the edited ones: δ at layer 1 moves the output
    tmp = tmp_path_factory.mktemp("distributed-edit")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(PARAGRAPHS * 3) + "\n")
    edit_file = tmp / "edits.jsonl"
    edit_file.write_text("".join(json.dumps(r) + "\n" for r in EDITS))
    args = [
        "edit",
        "--model",
        str(model),
        "--edits",
        str(edit_file),
        "--layers",
        "0-1",
        "--corpus",
        str(corpus),
    ]
    # δ in float32 (`dtype`): bf16 on CPUs that have it would round differently in each rank's smaller batches.
    args += ["--n-tokens", str(N_TOKENS), "--set", "max_steps=3", "--set", "dtype=float32"]
    args += ["--retry-rounds", "1", "--quiet"]
    torchrun = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "edit2deploy"]
    t = time.perf_counter()
    proc = _start([*torchrun, *args, "--out", str(tmp / "two")], tmp / "cache-two")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDIT2DEPLOY_CACHE", str(tmp / "cache-one"))
        mp.setenv("TQDM_DISABLE", "1")
        rc = cli.main([*args, "--out", str(tmp / "one")])
    two = _finish(proc, timeout=240)
    print(f"\none process and two (torchrun, at the same time) done in {time.perf_counter() - t:.1f} s")
    return {"two": (two, tmp / "two"), "one": (rc, tmp / "one"), "base": model}


def test_two_processes_edit_the_same_weights_as_one(edits):
    (two, two_out), (rc, one_out) = edits["two"], edits["one"]
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert rc == 0
    a, b = _weights(two_out), _weights(one_out)
    assert sorted(a) == sorted(b)
    worst = 0.0
    for name in a:
        if name not in EDITED:
            assert torch.equal(a[name], b[name]), name
            continue
        assert a[name].dtype == b[name].dtype == torch.float32
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
        worst = max(worst, (a[name] - b[name]).abs().max().item())
    base = _weights(edits["base"])
    assert all(not torch.equal(a[n], base[n]) for n in EDITED)  # the edit did something
    print(f"\nmax |W(2 processes) - W(1 process)| = {worst:.3g}")


def test_two_processes_write_the_same_ledger_as_one(edits):
    from edit2deploy.ledger import Ledger

    (two, two_out), (_, one_out) = edits["two"], edits["one"]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = Ledger.load(two_out).records, Ledger.load(one_out).records
    assert [r["id"] for r in a] == [r["id"] for r in b] == ["batch-0001"]
    assert a[0]["requests"] == b[0]["requests"] and [r["id"] for r in a[0]["requests"]] == [
        e["id"] for e in EDITS
    ]
    for key in ("steps", "converged", "retry", "config", "layers"):
        assert a[0][key] == b[0][key], key
    assert Ledger.load(two_out).state["prefixes"] == Ledger.load(one_out).state["prefixes"]
    assert two.stdout.count("wrote ") == 1 and "2 processes" in two.stdout, two.stdout
    assert "Traceback" not in two.stderr and "edit2deploy: error" not in two.stderr


def test_hardening_refuses_to_run_as_several_processes(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from edit2deploy import cli, distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    edit_file = tmp_path / "edits.jsonl"
    edit_file.write_text(json.dumps(EDITS[0]) + "\n")
    args = [
        "edit",
        "--model",
        str(tiny_model_dir("llama")),
        "--edits",
        str(edit_file),
        "--out",
        str(tmp_path / "o"),
    ]
    rc = cli.main([*args, "--harden-for", "Q4_K_M"])
    err = capsys.readouterr().err
    assert rc == 2 and "--harden-for does not run across processes" in err, err
    assert not (tmp_path / "o").exists()
