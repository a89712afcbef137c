"""Quantization simulation (`edit2deploy.quantsim` + the formats' simulators) and `edit2deploy predict`.

The simulators are checked against the real artifacts: a simulated weight must equal what the exported file
stores (dequantized), tensor for tensor. Tiny random models (hidden 256 so K-quants apply) test the mechanics;
`slow` tests compare predicted verdicts with llama.cpp's on the real SmolLM2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import FACTS, run_cli

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime missing")
needs_genai = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai missing"
)
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing"
)

EDITED = "model.layers.1.mlp.down_proj.weight"


def _sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def q_tiny(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny llama (hidden 256, FFN 512) whose layer-1 down_proj the 'ledger' says was edited."""
    src = tiny_model_dir("llama", hidden=256, ffn=512, layers=2)
    dst = tmp_path_factory.mktemp("q-tiny")
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    (dst / "edit2deploy").mkdir()
    (dst / "edit2deploy" / "state.json").write_text(
        json.dumps({"base_model": str(src), "edited_tensors": [EDITED]})
    )
    return dst


@pytest.fixture(scope="module")
def q_lm(q_tiny):
    from edit2deploy.models import open_model

    return open_model(str(q_tiny))


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


# ==================================================================== GGUF
@needs_llama
@pytest.mark.parametrize(
    "quant,protect", [("Q8_0", "q8_0"), ("Q4_K_M", "none"), ("Q4_K_M", "q8_0"), ("Q3_K_M", "none")]
)
def test_gguf_simulation_equals_the_exported_file(q_tiny, q_lm, quant, protect, tmp_path):
    from edit2deploy.formats import FORMATS
    from edit2deploy.formats.gguf.arch import ModelLayout

    art = FORMATS["gguf"].export(q_tiny, tmp_path / "m.gguf", quant, protect)
    stored = _gguf_tensors(art.path)
    scheme = FORMATS["gguf"].scheme(q_tiny, quant, protect)
    plan = scheme.plan()
    layout = ModelLayout.open(q_tiny)
    params = dict(q_lm.model.named_parameters())
    checked = 0
    for hf, tq in plan.items():
        gname = layout.gguf_name(hf)
        w = params[hf].detach().float()
        sim = w if tq.fake is None else tq.fake(w)
        expect = stored[gname]
        np.testing.assert_array_equal(layout.transform(hf, sim, n_vocab=None).numpy(), expect, err_msg=hf)
        assert tq.stored == art.edited_types.get(hf, tq.stored)
        checked += 1
    assert checked >= 15  # every 2-D weight and norm of the 2-layer model
    if protect == "q8_0":
        assert plan[EDITED].stored in ("Q8_0", "F16")


@needs_llama
def test_simulation_swaps_in_and_restores_bit_for_bit(q_tiny, q_lm):
    from edit2deploy.formats import FORMATS
    from edit2deploy.quantsim import Simulation

    sim = Simulation(q_lm, FORMATS["gguf"].scheme(q_tiny, "Q3_K_M", "none"))
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    before_sha = _sha(q_lm.model)
    with torch.no_grad():
        ref = q_lm.model(input_ids=ids).logits
        with sim.applied():
            quant = q_lm.model(input_ids=ids).logits
        again = q_lm.model(input_ids=ids).logits
    assert _sha(q_lm.model) == before_sha
    assert torch.equal(ref, again)
    assert not torch.allclose(ref, quant)  # 3-bit weights do change the logits
    # an in-place edit invalidates the cached simulation of that tensor only
    w = q_lm.arch.get_weight(q_lm.model, 1)
    old = sim._simulated(EDITED, w).clone()
    with torch.no_grad():
        w.add_(0.05)
    try:
        assert not torch.equal(sim._simulated(EDITED, w), old)
    finally:
        with torch.no_grad():
            w.sub_(0.05)


@needs_llama
def test_gguf_patch_plan_uses_the_base_types(q_tiny, tmp_path):
    from edit2deploy.formats import FORMATS
    from edit2deploy.formats.gguf.export import tensor_types

    base = FORMATS["gguf"].export(q_tiny, tmp_path / "base.gguf", "Q4_0", "none", edited_tensors=[]).path
    scheme = FORMATS["gguf"].scheme(q_tiny, None, "q8_0", patch_base=base)
    types = tensor_types(base)
    plan = scheme.plan()
    assert plan[EDITED].stored == "Q8_0"  # raised to the floor
    assert plan["model.layers.0.mlp.down_proj.weight"].stored == types["blk.0.ffn_down.weight"] == "Q4_0"


# ==================================================================== ONNX
@needs_genai
@needs_ort
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_onnx_simulation_equals_the_exported_matmulnbits(q_tiny, q_lm, quant, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edit2deploy.formats import FORMATS
    from edit2deploy.formats.onnx.sim import NBits

    art = FORMATS["onnx"].export(q_tiny, tmp_path / "onnx", quant, "none")
    model = onnx.load(str(art.path / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    node = next(
        n for n in model.graph.node if n.op_type == "MatMulNBits" and "layers.1/mlp/down_proj" in n.name
    )
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits, bs, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1, bs * bits // 8)
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
    plan = FORMATS["onnx"].scheme(q_tiny, quant, "none").plan()
    tq = plan[EDITED]
    assert tq.stored.startswith(f"int{bits}/b{bs}")
    sim = tq.fake(dict(q_lm.model.named_parameters())[EDITED].detach().float())
    # Re-quantizing the simulated weight with the same kernel is idempotent and gives the file's scales.
    from edit2deploy.formats.onnx.sim import matmul_nbits_fake

    again = matmul_nbits_fake(sim, NBits(bits, bs, tq.stored.endswith("/sym")))
    torch.testing.assert_close(again, sim, rtol=0, atol=1e-6)
    rebuilt = _dequant_nbits(packed, scales, node, inits, bits, k)
    np.testing.assert_allclose(sim.numpy(), rebuilt, rtol=0, atol=1e-6)


def _dequant_nbits(packed, scales, node, inits, bits, k):
    from onnx import numpy_helper

    n, kb, blob = packed.shape
    bs = blob * 8 // bits
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, kb, bs).astype(np.float32)
    else:
        q = packed.reshape(n, kb, bs).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :kb]
        zp = zp.astype(np.float32)
    else:
        zp = np.full((n, kb), 2 ** (bits - 1), np.float32)
    return ((q - zp[..., None]) * scales[..., None]).reshape(n, kb * bs)[:, :k]


# ==================================================================== bitsandbytes
@needs_bnb
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bnb_simulation_matches_bitsandbytes_layers(q_tiny, q_lm, quant):
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from edit2deploy.formats import FORMATS

    cfg = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if quant == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    qm = AutoModelForCausalLM.from_pretrained(
        q_tiny, quantization_config=cfg, dtype=torch.float32, device_map="cpu"
    )
    layer = qm.get_submodule("model.layers.0.mlp.down_proj")
    if quant == "nf4":
        real = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        real = layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127.0
    plan = FORMATS["bnb"].scheme(q_tiny, quant, "none").plan()
    sim = plan["model.layers.0.mlp.down_proj.weight"].fake(
        dict(q_lm.model.named_parameters())["model.layers.0.mlp.down_proj.weight"].detach().float()
    )
    torch.testing.assert_close(
        sim.float(), real.reshape(sim.shape), rtol=0, atol=1e-3 if quant == "int8" else 1e-6
    )
    protected = FORMATS["bnb"].scheme(q_tiny, quant, "f16").plan()
    assert protected[EDITED].fake is None and protected[EDITED].stored == "float32"


# ==================================================================== CLI
def test_predict_cli_usage_errors(q_tiny):
    r = run_cli("predict", "--model", str(q_tiny), "--quant", "Q9_X", "--edits", str(FACTS))
    assert r.returncode == 2 and "no format has type" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", "--model", str(q_tiny), "--quant", "int8", "--edits", str(FACTS))
    if "bnb" in r.stderr:  # bnb registered: int8 names two formats
        assert r.returncode == 2 and "ambiguous" in r.stderr
    r = run_cli("predict", "--model", str(q_tiny), "--quant", "gguf:Q4_K_M:maybe", "--edits", str(FACTS))
    assert r.returncode == 2 and "unknown value 'maybe'" in r.stderr
    r = run_cli("predict", "--model", str(q_tiny), "--quant", "Q8_0")  # no ledger requests in q_tiny's state
    assert r.returncode == 2


# ==================================================================== real SmolLM2
@pytest.mark.slow
@needs_llama
def test_predicted_verdicts_match_llama_cpp_on_smollm2(smollm2, smollm2_dir, tmp_path):
    """Unedited SmolLM2, facts.jsonl + 30 CounterFact cases: predicted Q3_K_M verdicts vs llama.cpp's."""
    from conftest import COUNTERFACT_VAL

    from edit2deploy.formats import FORMATS
    from edit2deploy.probes import run_probes
    from edit2deploy.quantsim import Simulation, predict, suite
    from edit2deploy.requests import load_requests

    requests = load_requests(FACTS) + load_requests(COUNTERFACT_VAL, limit=30)
    probes = suite(requests)
    pred = predict(
        Simulation(smollm2, FORMATS["gguf"].scheme(smollm2_dir, "Q3_K_M", "none", edited_tensors=[])),
        probes,
    )
    art = FORMATS["gguf"].export(smollm2_dir, tmp_path / "q3.gguf", "Q3_K_M", "none", edited_tensors=[])
    with FORMATS["gguf"].scorer(art) as sc:
        real = run_probes(sc, probes)
    agree = sum(r.predicted.success == q.success for r, q in zip(pred.rows, real)) / len(real)
    flips_real = sum(r.fp32.success != q.success for r, q in zip(pred.rows, real))
    assert agree >= 0.95, (agree, flips_real)
    # the prediction is not a copy of fp32: margins move the way llama.cpp's do
    corr = np.corrcoef(
        [r.predicted.margin - r.fp32.margin for r in pred.rows],
        [q.margin - r.fp32.margin for r, q in zip(pred.rows, real)],
    )[0, 1]
    assert corr > 0.5, corr


@needs_llama
@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_K", "Q6_K"])
def test_activation_rounding_matches_llama_cpp(q_tiny, q_lm, qtype_name, tmp_path):
    """One quantized layer in an otherwise F32 GGUF: llama.cpp's logits equal the simulation's once the layer's
    input is rounded like ggml-cpu does (Q8_0 / Q8_K blocks), and not without."""
    from gguf import GGMLQuantizationType as QT

    from edit2deploy.formats import FORMATS
    from edit2deploy.formats.gguf.arch import ModelLayout
    from edit2deploy.formats.gguf.patch import Replacement, rewrite, scan
    from edit2deploy.formats.gguf.quant import encode
    from edit2deploy.formats.gguf.sim import activation_fake, fake_quant
    from edit2deploy.quantsim import Simulation, TensorQuant

    qtype = QT[qtype_name]
    name = "model.layers.0.mlp.up_proj.weight"
    layout = ModelLayout.open(q_tiny)
    f32 = FORMATS["gguf"].export(q_tiny, tmp_path / "f32.gguf", "F32", "none")
    w = dict(q_lm.model.named_parameters())[name].detach().float()
    mixed = tmp_path / "mixed.gguf"
    data = layout.transform(name, w, n_vocab=None).numpy()
    rewrite(scan(f32.path), mixed, {layout.gguf_name(name): Replacement(encode(data, qtype), qtype)})
    ids = q_lm.tokenizer("The Eiffel Tower is located in the city of Paris", add_special_tokens=True)[
        "input_ids"
    ]
    with FORMATS["gguf"].scorer(FORMATS["gguf"].load(mixed)) as sc:
        real = sc.score([(q_lm.tokenizer.decode(ids[:3]), q_lm.tokenizer.decode(ids[3:]))])[0]

    def score(act):
        class Scheme:
            target = "mixed"

            def plan(self):
                return {name: TensorQuant(qtype.name, lambda t: fake_quant(t, qtype), act)}

        from edit2deploy.scoring import TorchScorer

        with Simulation(q_lm, Scheme()).applied():
            return TorchScorer(q_lm.model, q_lm.tokenizer).score(
                [(q_lm.tokenizer.decode(ids[:3]), q_lm.tokenizer.decode(ids[3:]))]
            )[0]

    if real.target_ids != score(None).target_ids:
        pytest.skip("tokenization of the split prompt differs")
    err_w = max(abs(a - b) for a, b in zip(score(None).logprobs, real.logprobs))
    err_a = max(abs(a - b) for a, b in zip(score(activation_fake(qtype)).logprobs, real.logprobs))
    assert err_a < 2e-3, (err_a, err_w)
    assert err_a < err_w


def test_predict_takes_the_one_target_grammar():
    from edit2deploy.errors import UsageError
    from edit2deploy.formats import parse_targets as parse_schemes

    got = [str(s) for s in parse_schemes("Q2_K:none,gguf:Q4_K_M,onnx:int4:none,nf4,q8_0:f16")]
    assert got == ["gguf:Q2_K:none", "gguf:Q4_K_M", "onnx:int4:none", "bnb:nf4", "gguf:Q8_0:f16"]
    with pytest.raises(UsageError, match="ambiguous"):
        parse_schemes("int8")
    with pytest.raises(UsageError, match="no format has type"):
        parse_schemes("Q9_X")
    with pytest.raises(UsageError):
        parse_schemes("gguf:Q4_K_M:maybe")
