"""ONNX export (onnxruntime-genai model builder; torch fallback for GPT-2), edit protection, and the ONNX scorers.

Fast tests use tiny random models (conftest's `tiny_model_dir`); `slow` tests use the real SmolLM2-135M-Instruct.
Each SmolLM2 export is built once per session by the module fixtures below (prefixed `o_`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from edit2deploy.errors import UsageError
from edit2deploy.formats import FORMATS, Artifact, Format, detect_format, get_format
from edit2deploy.formats.base import RECORD_FILE as META_FILE
from edit2deploy.formats.onnx.builder import QuantOptions, builder_extra_options, builder_node_candidates
from edit2deploy.formats.onnx.export import check as check_artifact
from edit2deploy.formats.onnx.export import standalone_generate
from edit2deploy.formats.onnx.graph import weight_nodes
from edit2deploy.probes import continuation, probes_for, run_probes
from edit2deploy.requests import load_requests
from edit2deploy.scoring import TorchScorer, hf_tokenize
from edit2deploy.synthetic import perturbed_copy

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir")),
    reason="the onnx extra (onnxruntime-genai, onnxruntime, onnx, onnx-ir) is not installed",
)

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "examples" / "facts.jsonl"
COUNTERFACT_VAL = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
EDITED_LAYERS = (4, 5, 6, 7, 8)
ONNX = FORMATS["onnx"]
PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin and Rome"),
    ("Hello", " world"),
    ("A longer prompt, so that the batch needs padding for", " this one"),
]


def _torch_scores(model_dir: Path, pairs):
    from edit2deploy.models import open_model

    lm = open_model(model_dir)
    return TorchScorer(lm.model, lm.tokenizer).score(pairs), lm


def _max_lp_diff(a, b) -> float:
    return max(max(abs(x - y) for x, y in zip(s.logprobs, r.logprobs, strict=True)) for s, r in zip(a, b))


# ==================================================================== registry, options, names
def test_registry_options_and_names(tmp_path):
    assert "onnx" in FORMATS and isinstance(ONNX, Format) and get_format("ONNX") is ONNX
    assert {"fp32", "int8", "int4"} <= set(ONNX.quants)
    assert not ONNX.detect(tmp_path) and detect_format(tmp_path) is None
    assert builder_node_candidates("model.layers.4.mlp.down_proj.weight") == (
        "/model/layers.4/mlp/down_proj/MatMul",
    )
    assert "/model/layers.2/attn/qkv_proj/MatMul" in builder_node_candidates(
        "model.layers.2.self_attn.k_proj.weight"
    )
    assert builder_node_candidates("model.norm.weight") == ()
    kv = builder_extra_options(
        "int4", QuantOptions(), tied=True, exclude=["/model/layers.4/mlp/down_proj/MatMul"]
    )
    assert kv == {
        "block_size": "32",
        "is_symmetric": "false",
        "matmul_mixed_precision": "last_matmul:int8",
        "shared_embeddings": "false",
        "nodes_to_exclude": "/model/layers.4/mlp/down_proj/MatMul",
    }
    opts = QuantOptions(block_size=128, accuracy_level=1, lm_head="float", symmetric=True)
    assert builder_extra_options("int4", opts, tied=False) == {
        "block_size": "128",
        "accuracy_level": "1",
        "is_symmetric": "true",
        "nodes_to_exclude": "/lm_head/MatMul",
    }
    assert builder_extra_options("fp32", QuantOptions(), tied=True) == {}
    with pytest.raises(UsageError, match="block size"):
        QuantOptions(block_size=48)
    with pytest.raises(UsageError, match="break scoring"):
        QuantOptions(extra={"prune_lm_head": "true"})


def test_bad_requests_fail_cleanly(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    with pytest.raises(UsageError, match="ONNX format takes"):
        ONNX.export(src, tmp_path / "o", "q4_k_m")
    with pytest.raises(UsageError, match="needs --execution-provider cuda"):
        ONNX.export(src, tmp_path / "o", "fp16")
    with pytest.raises(UsageError, match="does not support 'GPT2LMHeadModel'"):
        ONNX.export(tiny_model_dir("gpt2"), tmp_path / "o", "fp32", backend="builder")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="refusing to replace"):
        ONNX.export(src, precious, "fp32")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # nothing half-written left behind


# ==================================================================== builder path on a tiny model
def test_tiny_builder_fp32_matches_torch_with_bos(tiny_model_dir, tmp_path):
    """A tokenizer that prepends BOS: onnxruntime-genai keeps it on prompts, strips it from continuations."""
    src = tiny_model_dir("llama", add_bos=True)
    art = ONNX.export(src, tmp_path / "tiny-fp32", "fp32")
    assert art.format == "onnx" and art.extra["backend"] == "builder" and (art.path / META_FILE).is_file()
    assert ONNX.detect(art.path) and detect_format(art.path) == "onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-fp32"]  # written under a temp name, renamed
    ref, lm = _torch_scores(src, PAIRS)
    # onnxruntime-genai 0.18 does not apply tokenizer.json's BOS post-processor: the record says so, and the
    # scorer prepends the ids the HF tokenizer puts first (what an app must do too)
    tok = art.extra["tokenizer"]
    assert tok["hf_prefix"] == [lm.tokenizer.bos_token_id]
    assert tok["genai_matches_hf"] or tok["genai_needs_prefix"]
    for runtime in ("genai", "ort"):
        scorer = ONNX.scorer(art, runtime=runtime)
        got = scorer.score(PAIRS)
        for g, r, (p, c) in zip(got, ref, PAIRS, strict=True):
            assert g.prompt_ids[0] == lm.tokenizer.bos_token_id
            assert (list(g.prompt_ids), list(g.target_ids)) == hf_tokenize(lm.tokenizer, p, c)
            assert g.greedy_ids == r.greedy_ids
        assert _max_lp_diff(got, ref) < 1e-3, runtime
    loaded = ONNX.load(art.path)
    assert isinstance(loaded, Artifact) and loaded.quant == "fp32" and check_artifact(loaded) == []


def test_builder_takes_relative_paths(tiny_model_dir, tmp_path, monkeypatch):
    """`demo`/`run` pass paths relative to the working directory; the builder runs elsewhere (its cache dir)."""
    import shutil

    shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    art = ONNX.export(Path("model"), Path("out") / "onnx-int8", "int8")
    assert (tmp_path / "out" / "onnx-int8" / "model.onnx").is_file() and art.quant == "int8"


# ==================================================================== torch fallback (GPT-2) on a tiny model
@pytest.fixture(scope="module")
def o_gpt2_edited(tiny_model_dir, tmp_path_factory) -> Path:
    src = tiny_model_dir("gpt2")
    return perturbed_copy(
        src, tmp_path_factory.mktemp("o-gpt2-edited"), ["transformer.h.1.mlp.c_proj.weight"], 0.05
    )


def test_gpt2_fallback_fp32_int8_int4(o_gpt2_edited, tmp_path):
    edited = "transformer.h.1.mlp.c_proj.weight"
    ref, _ = _torch_scores(o_gpt2_edited, PAIRS)

    fp32 = ONNX.export(o_gpt2_edited, tmp_path / "fp32", "fp32")
    assert (
        fp32.extra["backend"] == "torch" and fp32.edited_names[edited] == "/transformer/h.1/mlp/c_proj/MatMul"
    )
    nodes = weight_nodes(fp32.path / "model.onnx")
    assert not any(n.op_type == "Gemm" for n in nodes.values())  # Conv1D Gemms rewritten as MatMul
    scorer = ONNX.scorer(fp32)
    assert scorer.name == "onnxruntime"
    assert _max_lp_diff(scorer.score(PAIRS), ref) < 1e-3
    # positions come from the mask inside the graph: left padding gives the same logits as no padding
    ids = scorer.tokenizer("Hello there, world")["input_ids"]
    alone = scorer.logits(ids)
    padded = scorer.session.run(
        ["logits"],
        {"input_ids": np.array([[0, 0] + ids]), "attention_mask": np.array([[0, 0] + [1] * len(ids)])},
    )[0][0, 2:]
    assert np.abs(alone - padded).max() < 1e-4

    int8 = ONNX.export(o_gpt2_edited, tmp_path / "int8", "int8")
    assert (
        int8.type_counts.get("int8", 0) >= 8 and int8.edited_types[edited] == "int8"
    )  # q8_0 floor: int8 is fine
    assert np.isfinite([x for s in ONNX.scorer(int8).score(PAIRS) for x in s.logprobs]).all()

    int4 = ONNX.export(o_gpt2_edited, tmp_path / "int4", "int4")
    ops = {n.name: (n.op_type, n.stored) for n in weight_nodes(int4.path / "model.onnx").values()}
    assert ops["/transformer/h.0/mlp/c_proj/MatMul_Q4"] == ("MatMulNBits", "int4")  # Conv1D reached 4-bit
    assert ops["/transformer/h.1/mlp/c_proj/MatMul"] == ("MatMul", "float32")  # the edited one is protected
    assert int4.edited_types[edited] == "float32" and check_artifact(int4) == []
    assert ops["/lm_head/MatMul_Q8"] == ("MatMulNBits", "int8")  # LM head at 8 bits by default
    lp = [x for s in ONNX.scorer(int4).score(PAIRS) for x in s.logprobs]
    assert np.isfinite(lp).all()


# ==================================================================== real SmolLM2-135M
@pytest.fixture(scope="module")
def o_facts():
    return probes_for(load_requests(FACTS))


@pytest.fixture(scope="module")
def o_pairs(o_facts):
    pairs = []
    for p in o_facts:
        pairs.append((p.prompt, continuation(p.expected)))
        if p.other is not None:
            pairs.append((p.prompt, continuation(p.other)))
    return pairs


@pytest.fixture(scope="module")
def o_torch(smollm2, o_facts, o_pairs):
    scorer = TorchScorer(smollm2.model, smollm2.tokenizer)
    return {"scored": scorer.score(o_pairs), "results": run_probes(scorer, o_facts)}


@pytest.fixture(scope="module")
def o_fp32(smollm2_dir, tmp_path_factory) -> Artifact:
    return ONNX.export(smollm2_dir, tmp_path_factory.mktemp("o-fp32") / "smollm2-fp32", "fp32")


@pytest.fixture(scope="module")
def o_int8(smollm2_dir, tmp_path_factory) -> Artifact:
    return ONNX.export(smollm2_dir, tmp_path_factory.mktemp("o-int8") / "smollm2-int8", "int8")


@pytest.fixture(scope="module")
def o_edited_dir(smollm2_dir, tmp_path_factory) -> Path:
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in EDITED_LAYERS]
    return perturbed_copy(smollm2_dir, tmp_path_factory.mktemp("o-edited"), names, scale=0.01)


@pytest.fixture(scope="module")
def o_int4_edited(o_edited_dir, tmp_path_factory) -> Artifact:
    return ONNX.export(o_edited_dir, tmp_path_factory.mktemp("o-int4") / "edited-int4", "int4")


@pytest.mark.slow
def test_smollm2_fp32_logprobs_match_torch(o_fp32, o_pairs, o_torch):
    assert o_fp32.edited_names == {} and o_fp32.type_counts == {"float32": o_fp32.type_counts["float32"]}
    assert o_fp32.extra["tokenizer"]["genai_matches_hf"]  # SmolLM2 adds no BOS: both tokenizers agree as is
    scorer = ONNX.scorer(o_fp32)
    got = scorer.score(o_pairs)
    assert [(s.prompt_ids, s.target_ids) for s in got] == [
        (s.prompt_ids, s.target_ids) for s in o_torch["scored"]
    ]
    assert _max_lp_diff(got, o_torch["scored"]) < 1e-3
    assert [s.greedy_ids for s in got] == [s.greedy_ids for s in o_torch["scored"]]


@pytest.mark.slow
def test_smollm2_tokenization_matches_hf(o_fp32, smollm2):
    """onnxruntime-genai's tokenizer gives the HF ids on the fact prompts and 50 CounterFact records."""
    requests = load_requests(FACTS)
    if COUNTERFACT_VAL.is_file():
        requests += load_requests(COUNTERFACT_VAL, limit=50)
    scorer = ONNX.scorer(o_fp32)
    n = 0
    for probe in probes_for(requests):
        for answer in (probe.expected, probe.other):
            if answer is not None:
                pair = (probe.prompt, continuation(answer))
                assert scorer.tokenize(*pair) == hf_tokenize(smollm2.tokenizer, *pair), pair
                n += 1
    assert n >= 300 if COUNTERFACT_VAL.is_file() else n >= 30


@pytest.mark.slow
def test_smollm2_int8_verdicts_agree_with_fp32(o_int8, o_facts, o_torch):
    assert o_int8.type_counts.get("int8", 0) >= 150  # every projection and the LM head
    results = run_probes(ONNX.scorer(o_int8), o_facts)
    agree = np.mean([a.success == b.success for a, b in zip(results, o_torch["results"], strict=True)])
    assert agree >= 0.95


@pytest.mark.slow
def test_smollm2_int4_protects_edited_down_proj(o_int4_edited, o_facts):
    art = o_int4_edited
    ops = {n.name: n for n in weight_nodes(art.path / "model.onnx").values()}
    for i in range(30):
        name = f"/model/layers.{i}/mlp/down_proj/MatMul"
        if i in EDITED_LAYERS:
            assert name in ops and ops[name].op_type == "MatMul" and ops[name].stored == "float32", name
        else:
            assert ops[f"{name}_Q4"].op_type == "MatMulNBits" and ops[f"{name}_Q4"].stored == "int4", name
    assert ops["/model/embed_tokens/Gather"].stored == "float32"  # the embedding is not 4-bit
    assert ops["/lm_head/MatMul_Q8"].stored == "int8"
    record = json.loads((art.path / META_FILE).read_text())
    hf = [f"model.layers.{i}.mlp.down_proj.weight" for i in EDITED_LAYERS]
    assert record["edited_names"] == {
        h: f"/model/layers.{i}/mlp/down_proj/MatMul" for h, i in zip(hf, EDITED_LAYERS)
    }
    assert set(record["edited_types"].values()) == {"float32"} and record["protect_edits"] == "q8_0"
    assert sorted(record["extra"]["excluded_nodes"]) == sorted(record["edited_names"].values())
    assert check_artifact(ONNX.load(art.path)) == []
    results = run_probes(ONNX.scorer(art), o_facts)
    assert all(np.isfinite(r.lp_expected) for r in results)


@pytest.mark.slow
def test_smollm2_onnx_runs_without_torch(o_fp32, o_torch, o_facts):
    """The exported directory needs only onnxruntime-genai: torch/transformers imports fail in the subprocess."""
    out = standalone_generate(o_fp32.path, "The capital of France is", max_new_tokens=5)
    assert out["blocked_loaded"] == [] and len(out["ids"]) == 5
    assert out["text"].startswith(" Paris")
