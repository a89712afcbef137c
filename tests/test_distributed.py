"""Key statistics across processes: `torchrun --nproc-per-node 2 -m edit2deploy stats` shards the corpus, sums the
float64 moments over the ranks and caches the same C (to float64 rounding) and token counts as one process; rank 0
alone prints. Both a text corpus and the generated one (sampled on rank 0, broadcast) are compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert rc == 2 and "only `stats` runs across processes" in err, err
