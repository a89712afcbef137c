"""Quantization-aware hardening (`edit --harden-for`): margin z-optimisation, re-solve, ledger, rollback.

The fast tests check the mechanics on a tiny random model; the slow one hardens real SmolLM2 edits against a
2-bit GGUF, where unhardened edits do flip, and checks that the prediction improves, the ledger says what was
hardened and rollback still restores the original bits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, run_cli

WIKI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)


def test_margin_rows_and_hinge():
    from edit2deploy.methods.values import margin_hinge, row_means

    lp = torch.tensor([-1.0, -3.0, -2.0, -0.5])
    rows = torch.tensor([0, 0, 1, 2])
    torch.testing.assert_close(row_means(lp, rows, 3), torch.tensor([-2.0, -2.0, -0.5]))
    margins = torch.tensor([0.2, 1.5, -1.0])
    owner = torch.tensor([0, 0, 1])
    # request 0: contexts short by 0.8 and 0 → 0.4 per context; request 1: short by 2.0 over 2 contexts → 1.0
    torch.testing.assert_close(margin_hinge(margins, owner, 2, 2, 1.0), torch.tensor([0.4, 1.0]))


@pytest.mark.slow
def test_margin_optimisation_reaches_the_margin(smollm2):
    """With margin m, a converged request beats its true answer by ≥ m in the bare prompt (real SmolLM2)."""
    from edit2deploy.methods.keys import context_templates
    from edit2deploy.methods.values import ValueHParams, optimise_values
    from edit2deploy.probes import continuation
    from edit2deploy.requests import load_requests
    from edit2deploy.scoring import TorchScorer

    lm = smollm2
    req = load_requests(EXAMPLES / "edits.jsonl", limit=2)
    templates = context_templates([])
    hp = ValueHParams(margin=2.0, mpes=True, max_steps=40, dtype="float32")
    res = optimise_values(lm, req, templates, 8, hp, quiet=True)
    block = lm.model.get_submodule(lm.arch.block_name(8))
    scorer = TorchScorer(lm.model, lm.tokenizer)
    from edit2deploy.methods.keys import locate_in_template

    assert any(res.converged)
    for i, r in enumerate(req):
        if not res.converged[i]:
            continue
        loc = locate_in_template(lm.tokenizer, "{}", r)
        delta = res.delta[:, i].float()

        def add(_m, _inp, out, pos=loc.subject_last, d=delta):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            if h.shape[1] > pos:
                h[:, pos] += d
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = block.register_forward_hook(add)
        try:
            new, true = scorer.score(
                [(r.text, continuation(r.target_new)), (r.text, continuation(r.target_true))]
            )
        finally:
            handle.remove()
        assert new.mean - true.mean >= 2.0 - 1e-3, (r.id, new.mean - true.mean)


def test_harden_flags_need_harden_for(tmp_path):
    r = run_cli(
        "edit",
        "--model",
        "nowhere",
        "--edits",
        str(EXAMPLES / "edits.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--harden-margin",
        "2",
    )
    assert r.returncode == 2 and "--harden-for" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@needs_llama
def test_hardening_real_smollm2_against_q2_k(tmp_path):
    from edit2deploy.ledger import Ledger, rollback, tensor_sha256
    from edit2deploy.models import resolve_model_dir

    out = tmp_path / "hardened"
    r = run_cli(
        "edit",
        "--model",
        "smollm2-135m",
        "--edits",
        str(EXAMPLES / "edits.jsonl"),
        "--out",
        str(out),
        "--harden-for",
        "Q2_K:none",
        "--harden-margin",
        "1.5",
        "--corpus",
        str(WIKI),
        "--n-tokens",
        "20000",  # the statistics the other real-model tests use (cached)
        "--layers",
        "4-8",
        "--quiet",
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hardening batch-0001" in r.stdout
    ledger = Ledger.load(out)
    rec = ledger.batch_record(ledger.active_batches[0])["hardening"]
    assert rec["targets"] == ["gguf:Q2_K:none"]
    before = rec["before"]["gguf:Q2_K:none"]["edited_survival"]
    after = rec["after"]["gguf:Q2_K:none"]["edited_survival"]
    assert after >= before
    assert all("round" in x and "hardened" in x for x in rec["rounds"])
    # what predict says for the written model is what the ledger recorded after hardening
    p = run_cli("predict", "--model", str(out), "--quant", "Q2_K:none", "--json", "--quiet", timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)["predictions"][0]
    edited = [f for f in doc["facts"] if f["kind"] in ("edit", "paraphrase")]
    assert abs(sum(f["survives"] for f in edited) / len(edited) - after) < 1e-9
    # rollback of a hardened batch restores the original bits
    rollback(out, last=1)
    from safetensors.torch import load_file

    orig = load_file(Path(resolve_model_dir("smollm2-135m")) / "model.safetensors")
    now = load_file(out / "model.safetensors")
    for name in ledger.state["edited_tensors"]:
        assert tensor_sha256(now[name]) == tensor_sha256(orig[name])
