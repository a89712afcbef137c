"""The edit ledger and rollback, through `edit_model` on a tiny llama: every batch is recorded with its
ΔW and hashes; rolling back restores the recorded bytes bit for bit; a later invocation continues the
ledger and its method state exactly; the input is never written; the output appears only when complete;
a batch whose solve is not finite is not applied."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tree_digest
from safetensors.torch import load_file

from edit2deploy import cli
from edit2deploy.errors import UsageError
from edit2deploy.ledger import LEDGER_DIR, Ledger, read_edit_info, rollback, tensor_sha256
from edit2deploy.methods import METHODS, EditConfig
from edit2deploy.methods.values import ValueHParams
from edit2deploy.models import open_model
from edit2deploy.ops.edit import edit_model, prepare_editor

REQUESTS = [
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
]
LAYERS = (0, 1)
NAMES = [f"model.layers.{li}.mlp.down_proj.weight" for li in LAYERS]
# one solve per batch: the ledger's mechanics are under test (a failed-batch test counts the solves)
CFG = EditConfig(layers=LAYERS, retry_rounds=0, values=ValueHParams(max_steps=2))
N_TOKENS = 2000


def write_edits(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def shas(model_dir: Path) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in weights(model_dir).items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """A private statistics cache for the module, a corpus file, the edit file and the base model."""
    root = tmp_path_factory.mktemp("ledger")
    corpus = root / "corpus.txt"
    text = (
        Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    ).read_text()
    corpus.write_text(text[:40_000])
    base = tiny_model_dir("llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDIT2DEPLOY_CACHE", str(root / "cache"))
        mp.setenv("TQDM_DISABLE", "1")
        yield {
            "root": root,
            "corpus": corpus,
            "edits": write_edits(root / "edits.jsonl", REQUESTS),
            "base": base,
        }


@pytest.fixture(scope="module")
def three(env):
    """Three sequential batches of one request each, in one invocation."""
    before = tree_digest(env["base"])
    out = env["root"] / "three"
    run = edit_model(
        str(env["base"]),
        env["edits"],
        out,
        cfg=CFG,
        batch_size=1,
        corpus=env["corpus"],
        n_tokens=N_TOKENS,
        quiet=True,
    )
    assert tree_digest(env["base"]) == before  # the input model directory is only read
    return run, out


def _edit(env, edits, out, model=None, **kw):
    kw = {"cfg": CFG, "batch_size": 1, "corpus": env["corpus"], "n_tokens": N_TOKENS, "quiet": True, **kw}
    return edit_model(str(model or env["base"]), edits, out, **kw)


# ================================================================ what a batch records
def test_ledger_records_every_batch(env, three):
    run, out = three
    assert run.out == out and run.failed is None
    assert [b["id"] for b in run.batches] == ["batch-0001", "batch-0002", "batch-0003"]
    ledger = Ledger.load(out)
    assert ledger.active_batches == ["batch-0001", "batch-0002", "batch-0003"]
    assert ledger.state["edited_tensors"] == NAMES
    assert ledger.state["n_tokens"] == N_TOKENS and ledger.state["corpus_path"] == str(env["corpus"])
    assert len(ledger.state["prefixes"]) == 5
    assert read_edit_info(out).edited_tensors == NAMES
    assert read_edit_info(env["base"]).edited_tensors == []
    base_w, out_w = weights(env["base"]), weights(out)
    assert set(base_w) == set(out_w)
    for name in base_w:  # only the edited tensors changed
        assert torch.equal(base_w[name], out_w[name]) == (name not in NAMES), name
    for name in NAMES:
        assert torch.equal(ledger.originals[name], base_w[name])
        w = base_w[name].clone()
        prev = tensor_sha256(w)
        for rec in ledger.records:
            t = rec["tensors"][name]
            assert t["sha256_before"] == prev
            delta = ledger.batch_tensors[rec["id"]][f"delta.{name}"]
            assert delta.dtype == torch.float32 and delta.shape == w.shape
            assert t["delta_fro"] == pytest.approx(float(delta.double().norm()))
            w.add_(delta)
            assert t["sha256_after"] == tensor_sha256(w)
            prev = t["sha256_after"]
            assert t["fro_from_original"] == pytest.approx(float((w.double() - base_w[name].double()).norm()))
        assert torch.equal(w, out_w[name])  # W0 + Δ1 + Δ2 + Δ3, bit for bit
    for rec in ledger.records:
        assert rec["method"] == "default" and rec["layers"] == list(LAYERS)
        assert rec["config"]["values"]["max_steps"] == 2 and len(rec["requests"]) == 1
        keys = ledger.batch_tensors[rec["id"]]
        # one request: its text key and its chat key (chat contexts on: the model has a chat template)
        assert keys["keys.0"].dtype == torch.float64 and keys["keys.0"].shape == (128, 2)
    assert set(ledger.method_state) == {"null_basis.0", "null_basis.1"}


# ================================================================ rollback
def test_rollback_last_then_all_restores_original_bits(env, three, tmp_path, capsys):
    _, out = three
    ledger = Ledger.load(out)
    one = tmp_path / "one"
    assert cli.main(["rollback", "--model", str(out), "--last", "1", "--out", str(one)]) == 0
    assert "2/2 edited tensors match their recorded SHA-256" in capsys.readouterr().out
    rec2 = ledger.batch_record("batch-0002")
    for name in NAMES:
        assert tensor_sha256(weights(one)[name]) == rec2["tensors"][name]["sha256_after"]
    assert Ledger.load(one).active_batches == ["batch-0001", "batch-0002"]
    # then the rest, in place
    res = rollback(one, last=2)
    assert res["removed"] == ["batch-0001", "batch-0002"] and res["kept"] == []
    assert res["verified"] == dict.fromkeys(NAMES, True)
    assert shas(one) == shas(env["base"])  # every tensor, bit for bit
    for name in NAMES:
        assert torch.equal(weights(one)[name], weights(env["base"])[name])
    led = Ledger.load(one)
    assert led.active_batches == []
    assert [r["type"] for r in led.records] == ["batch"] * 3 + ["rollback"] * 2
    assert weights(out)[NAMES[0]].ne(weights(env["base"])[NAMES[0]]).any()  # --out left the source alone
    assert (one / "config.json").read_text() == (out / "config.json").read_text()
    assert (one / "tokenizer.json").is_file()


def test_rollback_named_middle_batch_is_unverified(env, three, tmp_path, capsys):
    _, out = three
    mid = tmp_path / "mid"
    shutil.copytree(out, mid)
    assert cli.main(["rollback", "--model", str(mid), "--batch", "batch-0002"]) == 0
    assert "not hash-checked" in capsys.readouterr().out
    led = Ledger.load(mid)
    assert led.active_batches == ["batch-0001", "batch-0003"]
    w = weights(mid)
    for name in NAMES:  # W0 + Δ1 + Δ3, added in that order
        expect = led.originals[name].clone()
        expect.add_(led.batch_tensors["batch-0001"][f"delta.{name}"])
        expect.add_(led.batch_tensors["batch-0003"][f"delta.{name}"])
        assert torch.equal(w[name], expect)
    assert cli.main(["log", "--model", str(mid), "--json"]) == 0
    log = json.loads(capsys.readouterr().out)
    assert log["state"]["batches"] == ["batch-0001", "batch-0003"]
    assert log["records"][-1]["type"] == "rollback" and log["records"][-1]["removed"] == ["batch-0002"]
    with pytest.raises(UsageError, match="already rolled back"):
        rollback(mid, batch="batch-0002")
    # undoing the rest gets back to the original exactly
    res = rollback(mid, last=2)
    assert res["verified"] == dict.fromkeys(NAMES, True)
    assert shas(mid) == shas(env["base"])


def test_rollback_after_middle_rollback_and_further_edit(env, three, tmp_path):
    """b1 b2 b3, undo b2, edit b4 on top: undoing b4 must give W0 + Δ1 + Δ3 (recorded as b4's 'before')."""
    _, out = three
    mid = tmp_path / "mid"
    rollback(out, batch="batch-0002", out=mid)
    more = tmp_path / "more"
    _edit(env, write_edits(tmp_path / "e.jsonl", REQUESTS[1:2]), more, model=mid)
    led = Ledger.load(more)
    assert led.active_batches == ["batch-0001", "batch-0003", "batch-0004"]
    res = rollback(more, last=1)
    assert res["verified"] == dict.fromkeys(NAMES, True)
    assert shas(more) == shas(mid)


def test_rollback_usage_errors(env, three, tmp_path):
    _, out = three
    for kw, msg in [
        ({"last": 0}, "--last 0"),
        ({"last": 4}, "3 active"),
        ({"batch": "batch-0009"}, "no batch"),
        ({}, "exactly one"),
        ({"last": 1, "batch": "batch-0001"}, "exactly one"),
    ]:
        with pytest.raises(UsageError, match=msg):
            rollback(out, **kw)
    with pytest.raises(UsageError, match="no edit ledger"):
        rollback(env["base"], last=1)
    assert Ledger.load(env["base"]) is None


@pytest.mark.parametrize(
    "command", [["log"], ["rollback", "--last", "1"], ["rollback", "--batch", "batch-0001"]]
)
def test_cli_log_and_rollback_on_unedited_dir(env, command, capsys):
    assert cli.main([command[0], "--model", str(env["base"]), *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edit2deploy: error:") and "no edit ledger" in err[0]


def test_cli_log_json(three, capsys):
    _, out = three
    assert cli.main(["log", "--model", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"]["batches"] == ["batch-0001", "batch-0002", "batch-0003"]
    assert [r["id"] for r in data["records"]] == ["batch-0001", "batch-0002", "batch-0003"]


# ================================================================ sequential invocations
def test_second_invocation_continues_the_ledger(env, three, tmp_path):
    """edit → out1, edit --model out1 → out2 equals both batches in one invocation."""
    _, out3 = three
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    _edit(env, write_edits(tmp_path / "e1.jsonl", REQUESTS[:1]), out1)
    before = tree_digest(out1)
    # continuing: corpus and token count come from the ledger (giving different ones is an error)
    run = _edit(
        env, write_edits(tmp_path / "e2.jsonl", REQUESTS[1:2]), out2, model=out1, corpus=None, n_tokens=None
    )
    assert tree_digest(out1) == before
    assert [b["id"] for b in run.batches] == ["batch-0002"]
    led1, led2, led3 = Ledger.load(out1), Ledger.load(out2), Ledger.load(out3)
    assert led2.active_batches == ["batch-0001", "batch-0002"]
    assert led2.state["prefixes"] == led1.state["prefixes"] == led3.state["prefixes"]
    assert led2.state["base_model"] == str(Path(env["base"]).resolve())
    w2 = weights(out2)
    for name in NAMES:
        assert torch.equal(led2.originals[name], led1.originals[name])
        expect = led3.replay(name, ["batch-0001", "batch-0002"])
        assert torch.allclose(w2[name], expect, rtol=0, atol=1e-6)
        assert torch.equal(w2[name], expect)  # in fact bit for bit: same operations in the same order
    # the method state carried over: Σ Kp Kpᵀ from the stored keys, and the same null-space basis
    lm1 = open_model(out1)
    editor, _, _ = prepare_editor(lm1, CFG, quiet=True)
    for li in LAYERS:
        K1 = led1.batch_tensors["batch-0001"][f"keys.{li}"]
        assert torch.allclose(editor.state[li].KpKpT(), K1 @ K1.T, rtol=1e-12)
        assert torch.equal(editor.state[li].null_basis, led1.method_state[f"null_basis.{li}"])
    with pytest.raises(UsageError, match="--n-tokens differs"):
        prepare_editor(lm1, CFG, n_tokens=N_TOKENS + 1, quiet=True)
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n")
    with pytest.raises(UsageError, match="--corpus differs"):
        prepare_editor(lm1, CFG, corpus=other, quiet=True)


# ================================================================ failures
def test_output_appears_only_when_complete(env, tmp_path, monkeypatch):
    def boom(self, model_dir):
        (model_dir / LEDGER_DIR).mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(Ledger, "write_into", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        _edit(
            env,
            write_edits(tmp_path / "e.jsonl", REQUESTS[:1]),
            out,
            cfg=dataclasses.replace(CFG, values=ValueHParams(max_steps=1)),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]  # no out, no temporary directory


def test_non_finite_batch_is_not_applied(env, three, tmp_path, monkeypatch, capsys):
    """NaN from the second batch's solve at its second layer: nothing of that batch is applied, the first
    batch is written, and the CLI exits 1 naming the batch."""
    spec = METHODS["default"]
    calls = []

    def solve(K, R, C, state, cfg, drift=None, Kn=None):
        calls.append(1)
        dW = spec.solve(K, R, C, state, cfg, drift, Kn)
        return torch.full_like(dW, float("nan")) if len(calls) == 4 else dW

    monkeypatch.setitem(METHODS, "default", dataclasses.replace(spec, solve=solve))
    cfg_file = tmp_path / "edit.toml"
    cfg_file.write_text("[edit]\nmax_steps = 2\nretry_rounds = 0\n")  # solve calls counted: one per layer
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--quiet",
            "edit",
            "--model",
            str(env["base"]),
            "--edits",
            str(env["edits"]),
            "--out",
            str(out),
            "--layers",
            "0-1",
            "--batch-size",
            "1",
            "--corpus",
            str(env["corpus"]),
            "--n-tokens",
            str(N_TOKENS),
            "--config",
            str(cfg_file),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "batch batch-0002 was not applied" in err and "not finite" in err
    assert len(calls) == 4  # the run stopped at the failed batch
    led = Ledger.load(out)
    assert led.active_batches == ["batch-0001"]
    assert led.records[-1]["type"] == "failed_batch" and led.records[-1]["batch"] == "batch-0002"
    assert led.records[-1]["requests"] == ["darrieux"]
    rec1 = Ledger.load(three[1]).batch_record("batch-0001")
    for name in NAMES:  # the state after batch 1 exactly (the failed batch's first layer was restored)
        assert tensor_sha256(weights(out)[name]) == rec1["tensors"][name]["sha256_after"]


@pytest.mark.parametrize("damage", ["batch-file", "original-file", "ledger-json"])
def test_damaged_ledger_is_a_usage_error(three, tmp_path, damage, capsys):
    _, out = three
    d = tmp_path / "damaged"
    shutil.copytree(out, d)
    target = {
        "batch-file": d / LEDGER_DIR / "batches" / "batch-0002.safetensors",
        "original-file": d / LEDGER_DIR / "original.safetensors",
        "ledger-json": d / LEDGER_DIR / "ledger.jsonl",
    }[damage]
    target.write_bytes(target.read_bytes()[:50])
    with pytest.raises(UsageError, match="the edit ledger is damaged"):
        Ledger.load(d)
    assert cli.main(["rollback", "--model", str(d), "--last", "1"]) == 2
    assert "damaged" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "add_bos"), [("gpt2", False), ("gemma3_text", True)])
def test_other_families_edit_and_roll_back(env, tiny_model_dir, tmp_path, family, add_bos):
    """GPT-2 (Conv1D: weights stored transposed) and Gemma 3 (a tokenizer that prepends BOS)."""
    base = tiny_model_dir(family, add_bos=add_bos)
    out = tmp_path / "out"
    run = _edit(
        env, env["edits"], out, model=base, batch_size=None, cfg=dataclasses.replace(CFG, method="memit")
    )
    assert run.failed is None and len(run.batches) == 1 and len(run.batches[0]["requests"]) == 3
    led = Ledger.load(out)
    names = led.state["edited_tensors"]
    assert len(names) == 2
    b, o = weights(base), weights(out)
    for name in b:
        assert torch.equal(b[name], o[name]) == (name not in names), name
    for name in names:
        assert torch.equal(o[name], b[name] + led.batch_tensors["batch-0001"][f"delta.{name}"])
    assert rollback(out, last=1)["verified"] == dict.fromkeys(names, True)
    assert shas(out) == shas(base)
