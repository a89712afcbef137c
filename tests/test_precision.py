"""Precision by role: a bf16/fp16 checkpoint loads in its own dtype (every registered family), the edited
projections are held and stored in float32 beside it, an edited model reopens with them exact, rollback gives
back the checkpoint's own bf16 tensors bit for bit, and every stage records its peak memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FACTS, FAMILIES, run_cli
from safetensors import safe_open
from safetensors.torch import load_file

from edit2deploy.errors import UsageError
from edit2deploy.ledger import Ledger, rollback
from edit2deploy.memory import PeakMemory
from edit2deploy.methods import EditConfig
from edit2deploy.methods.values import ValueHParams
from edit2deploy.models import open_model
from edit2deploy.ops.edit import edit_model
from edit2deploy.precision import checkpoint_dtype, hold_in_float32

REQUESTS = [
    {"id": "eiffel", "prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"id": "messi", "prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "ice hockey"},
]  # fmt: skip
CFG = EditConfig(layers=(0, 1), values=ValueHParams(max_steps=3))


def stored_dtypes(model_dir: Path) -> dict[str, str]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})  # noqa: SIM118 (a safe_open handle is not a dict)
    return out


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def half_model_dir(tiny_model_dir, tmp_path_factory):
    """`half_model_dir(family, dtype)`: a tiny checkpoint saved in bf16/fp16 (config.json says so)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made: dict[tuple, Path] = {}

    def make(family: str, dtype: torch.dtype = torch.bfloat16) -> Path:
        if (family, dtype) not in made:
            src = tiny_model_dir(family)
            out = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}")
            AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(out)
            AutoTokenizer.from_pretrained(src).save_pretrained(out)
            made[(family, dtype)] = out
        return made[(family, dtype)]

    return make


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    corpus = tmp_path / "corpus.txt"
    wiki = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    corpus.write_text(wiki.read_text()[:20_000])
    return corpus


def edits_file(tmp_path: Path) -> Path:
    p = tmp_path / "edits.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return p


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_in_the_checkpoint_dtype(half_model_dir, family):
    d = half_model_dir(family)
    assert checkpoint_dtype(d, json.loads((d / "config.json").read_text())) == torch.bfloat16
    lm = open_model(d)  # auto: the checkpoint's own dtype
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert open_model(d, dtype="float32").dtype == torch.float32
    # an edited projection held in float32 inside the bf16 model: same outputs to bf16 rounding, dtypes kept
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        names = [lm.arch.mlp_out_name(li) for li in range(lm.num_layers)]
        assert hold_in_float32(lm.model, names) == names
        assert lm.arch.get_weight(lm.model, 0).dtype == torch.float32
        after = lm.model(input_ids=ids).logits
    assert after.dtype == torch.bfloat16 and lm.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before.float(), atol=0.05, rtol=0.05)


def test_checkpoint_dtype_from_header_when_config_is_silent(half_model_dir, tmp_path):
    d = half_model_dir("llama", torch.float16)
    assert checkpoint_dtype(d, {}) == torch.float16  # the safetensors header
    assert checkpoint_dtype(tmp_path, {}) == torch.float32  # no weights at all
    assert checkpoint_dtype(d, {"torch_dtype": "bfloat16"}) == torch.bfloat16  # transformers < 4.56's key


def test_bad_dtype_is_a_usage_error(tiny_model_dir, tmp_path):
    with pytest.raises(
        UsageError, match=r"--dtype: 'float8' \(expected one of auto, bfloat16, float16, float32\)"
    ):
        open_model(tiny_model_dir("llama"), dtype="float8")
    d = str(tiny_model_dir("llama"))
    proc = run_cli(
        "edit", "--model", d, "--edits", str(FACTS), "--out", str(tmp_path / "o"), "--dtype", "int4"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--dtype: 'int4'" in proc.stderr


def test_bf16_edit_stores_edited_projections_in_float32_and_reopens_them_exact(
    half_model_dir, cache, tmp_path
):
    base = half_model_dir("llama")
    out = tmp_path / "edited"
    run = edit_model(str(base), edits_file(tmp_path), out, cfg=CFG, corpus=cache, n_tokens=1500, quiet=True)
    assert run.out == out and not run.failed
    edited = {f"model.layers.{li}.mlp.down_proj.weight" for li in (0, 1)}
    types = stored_dtypes(out)
    assert {k for k, v in types.items() if v == "F32"} == edited
    assert all(v == "BF16" for k, v in types.items() if k not in edited)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the edit is not the bf16 rounding of W0 + ΔW: it is kept exactly
    w = weights(out)
    ledger = Ledger.load(out)
    for name in edited:
        assert not torch.equal(w[name], w[name].bfloat16().float())
        assert torch.equal(w[name], ledger.replay(name, ledger.active_batches))
    lm = open_model(out)
    assert lm.dtype == torch.bfloat16
    for li in (0, 1):
        assert torch.equal(lm.arch.get_weight(lm.model, li), w[f"model.layers.{li}.mlp.down_proj.weight"])
    assert lm.arch.get_weight(lm.model, 2 if lm.num_layers > 2 else 0).dtype == torch.float32
    # peak memory of each stage, in the ledger and the run
    assert set(run.memory.rss) >= {"load", "statistics", "batch-0001", "write"}
    assert all(v > 0 for v in run.memory.rss.values())
    peaks = ledger.batch_record("batch-0001")["peak_rss_mib"]
    assert set(peaks) == {"load", "statistics", "batch"} and all(v > 0 for v in peaks.values())
    # rolling everything back gives the bf16 checkpoint's own tensors back, bit for bit and in bf16
    back = tmp_path / "back"
    res = rollback(out, last=1, out=back)
    assert all(res["verified"].values())
    assert stored_dtypes(back) == stored_dtypes(base)
    original = weights(base)
    for name, t in weights(back).items():
        assert torch.equal(t, original[name]), name


def test_float32_checkpoint_edits_as_before(tiny_model_dir, cache, tmp_path):
    """A float32 checkpoint (SmolLM2 as the built-in ships it) is unchanged by `auto`: every tensor float32."""
    out = tmp_path / "edited"
    edit_model(str(tiny_model_dir("llama")), edits_file(tmp_path), out, cfg=CFG, corpus=cache, n_tokens=1500, quiet=True)  # fmt: skip
    assert set(stored_dtypes(out).values()) == {"F32"}


def test_peak_memory_per_stage_sees_the_allocation():
    mem = PeakMemory()
    with mem.stage("small"):
        pass
    with mem.stage("big"):
        import mmap

        block = mmap.mmap(-1, 64 * 2**20)  # 64 MiB of fresh pages (malloc may reuse resident memory)
        block.write(b"\x01" * len(block))
        block.close()
    assert mem.per_stage  # Linux: the high-water mark is reset at each stage
    assert mem.rss["big"] >= mem.rss["small"] + 50
    assert mem.to_json()["peak_rss_mib"] == mem.rss


def test_run_on_a_bf16_checkpoint_exports_and_verifies_with_peaks_per_stage(
    half_model_dir, cache, tmp_path, monkeypatch
):
    """The whole chain on a bf16 checkpoint: the exporter reads the float32 edited projections beside bf16
    tensors, llama.cpp verifies (one runtime at a time, as for a model that fits memory only once), and the report
    gives each stage's peak memory."""
    from edit2deploy import run
    from edit2deploy.ops import run as run_module

    available = run_module.available_mib
    monkeypatch.setattr(run_module, "available_mib", lambda: 1.0)  # as if the model barely fit

    res = run(
        str(half_model_dir("llama")),
        edits_file(tmp_path),
        "gguf:Q8_0",
        tmp_path / "run",
        cfg=CFG,
        corpus=cache,
        n_tokens=1500,
        gates=["survival=0", "specificity_drop=off", "chat_efficacy=off", "generation_survival=off"],
        quiet=True,
    )
    assert res.passed
    assert Ledger.load(res.model_dir).state["weights_dtype"] == "bfloat16"
    doc = json.loads(res.reports["json"].read_text())
    peaks = doc["memory"]["peak_rss_mib"]
    assert {"edit", "reference", "export gguf:Q8_0", "verify gguf:Q8_0"} <= set(peaks)
    assert all(v > 0 for v in peaks.values())
    inner = [v for r in Ledger.load(res.model_dir).records for v in r.get("peak_rss_mib", {}).values()]
    assert inner and peaks["edit"] >= max(inner)  # the edit's own stages reset the high-water mark
    assert "Peak memory" in res.reports["md"].read_text()
    monkeypatch.setattr(run_module, "available_mib", available)
    # asking for float32 weights edits again (the reused model was made in bf16)
    again = run(
        str(half_model_dir("llama")), edits_file(tmp_path), "gguf:Q8_0", tmp_path / "run", cfg=CFG, corpus=cache,
        n_tokens=1500, gates=["survival=0", "specificity_drop=off", "chat_efficacy=off", "generation_survival=off"], quiet=True, dtype="float32",
    )  # fmt: skip
    assert not again.edit_cached and "loaded in bfloat16, not float32" in again.edit_note
    assert set(stored_dtypes(again.model_dir).values()) == {"F32"}


def test_open_slot_keeps_one_runtime_open_and_the_scores_equal(tiny_model_dir):
    """Verify of a model too big to hold three times: scorers sharing an `OpenSlot` open one model at a time (the
    other is closed, its scores kept) and score exactly what they score when all stay open."""
    from edit2deploy.ops.scores import CachedScorer, OpenSlot, torch_factory

    a_dir, b_dir = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    pairs = [("The Eiffel Tower is in", " Paris"), ("Messi plays", " football")]
    free = [CachedScorer(torch_factory(d, "cpu")) for d in (a_dir, b_dir)]
    slot = OpenSlot()
    held = [CachedScorer(torch_factory(d, "cpu"), slot=slot) for d in (a_dir, b_dir)]
    want = [s.score(pairs) for s in free]
    got_a = held[0].score(pairs)
    assert held[0].opened
    got_b = held[1].score(pairs)
    assert held[1].opened and not held[0].opened  # opening the second closed the first
    assert held[0].score(pairs) == got_a and not held[0].opened  # remembered: no reopening
    held[0].score([("Rome is in", " Italy")])  # something new: reopens, closing the other
    assert held[0].opened and not held[1].opened and slot.opens == 3
    for got, exp in zip((got_a, got_b), want, strict=True):
        assert [g.logprobs for g in got] == [e.logprobs for e in exp]
    for s in (*free, *held):
        s.close()
    assert slot.holder is None


def test_float32_products_from_bf16_weights_give_torch_s_own_gradients():
    """The AVX2 path (`compute_in_float32`): outputs and input gradients as an explicit float32 product, the weight
    kept in bf16 (no float32 copy is saved for backward)."""
    from edit2deploy.precision import compute_in_float32

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    model.requires_grad_(False)
    ref = [(m.weight.float(), m.bias.float()) for m in model]
    assert compute_in_float32(model) == 2
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    model(x).float().sum().backward()
    got = x.grad.clone()
    x.grad = None
    h = x
    for w, b in ref:
        h = torch.nn.functional.linear(h.float(), w, b).to(torch.bfloat16)
    h.float().sum().backward()
    assert torch.equal(got, x.grad)
    assert all(m.weight.dtype == torch.bfloat16 for m in model)


@pytest.mark.parametrize("fast_bf16", [False, True])
@pytest.mark.parametrize("z_dtype", ["auto", "float32"])
def test_z_optimisation_on_bf16_weights_with_and_without_native_bf16(
    half_model_dir, monkeypatch, fast_bf16, z_dtype
):
    """The float32 z = h + δ meets bf16 weights: upcast per call on CPUs without native bf16 (AVX2), autocast on
    those with it (AMX, AVX512-BF16) and on GPUs, whatever the δ precision setting."""
    from edit2deploy.methods.values import optimise_values
    from edit2deploy.requests import EditRequest

    monkeypatch.setattr("edit2deploy.precision.cpu_has_fast_bf16", lambda: fast_bf16)  # open_model, values
    monkeypatch.setattr("edit2deploy.methods.values.cpu_has_fast_bf16", lambda: fast_bf16)  # autocast_dtype
    lm = open_model(half_model_dir("llama"))
    requests = [
        EditRequest(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"]) for r in REQUESTS
    ]
    hp = ValueHParams(max_steps=3, mpes=False, loss_stop=0.0, dtype=z_dtype)
    values = optimise_values(lm, requests, ["{}", "The weather. {}"], 1, hp, quiet=True)
    assert values.delta.dtype == torch.float64 and torch.isfinite(values.delta).all()
    assert values.delta.abs().max() > 0 and values.steps == [3, 3]
