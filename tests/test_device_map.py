"""`--device-map auto` / `--max-memory`: a model past one device, placed by accelerate's big-model inference.

On this CPU-only machine "past one device" is past the CPU: with a `max_memory` that holds the embeddings and the
edited layers only, the blocks above them (and the head) are offloaded to disk. The edit must come out as it does
with the whole model in memory, and the written model must hold real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, run_cli
from safetensors.torch import load_file

from edit2deploy.errors import UsageError
from edit2deploy.forward import replay_lower_blocks
from edit2deploy.methods import EditConfig
from edit2deploy.methods.values import ValueHParams
from edit2deploy.models import open_model, parse_max_memory
from edit2deploy.ops.edit import edit_model

REQUESTS = [
    {
        "id": "eiffel",
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
    },
    {"id": "messi", "prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "ice hockey"},
]
LAYERS = (0, 1)
# δ in float32: on CPUs with native bf16 the default runs it in bf16, where two placements' different summation
# orders grow past float tolerance over the steps.
CFG = EditConfig(layers=LAYERS, values=ValueHParams(max_steps=3, dtype="float32"))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm2_dir):
    """A 4-layer llama with an untied head, and a CPU budget that holds the embeddings, layers 0-1 and accelerate's
    reserve for loading the largest offloaded module (the head), but not layer 2.

    Untied: with a tied head the embedding is also the largest module, and accelerate reserves room for it beside
    itself, which leaves room for every small block of a tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("device-map")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    base = root / "base"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(base)
    tok.save_pretrained(base)
    w = weights(base)

    def size(prefix: str) -> int:
        return sum(t.numel() * t.element_size() for n, t in w.items() if n.startswith(prefix))

    budget = (
        size("model.embed_tokens.")
        + size("model.layers.0.")
        + size("model.layers.1.")
        + size("lm_head.")
        + size("model.layers.2.") // 2
    )
    corpus = root / "corpus.txt"
    wiki = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    corpus.write_text(wiki.read_text()[:20_000])
    edits = root / "edits.jsonl"
    edits.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")
        yield {"root": root, "base": base, "budget": budget, "corpus": corpus, "edits": edits}


def _edit(env, out: Path, cache: str, monkeypatch, **kw):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(env["root"] / cache))  # statistics computed in each run
    return edit_model(
        str(env["base"]), env["edits"], out, cfg=CFG, corpus=env["corpus"], n_tokens=1000, quiet=True, **kw
    )


def test_offloaded_model_edits_as_in_memory(env, monkeypatch):
    max_memory = {"cpu": env["budget"]}
    lm = open_model(env["base"], device_map="auto", max_memory=max_memory, resident=LAYERS)
    placed = lm.model.hf_device_map
    assert [placed[f"model.layers.{i}"] for i in range(4)] == ["cpu", "cpu", "disk", "disk"]
    assert placed["lm_head"] == "disk"
    assert lm.model.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    del lm

    plain = _edit(env, env["root"] / "plain", "cache-plain", monkeypatch)
    # small shards, so that offloaded tensors are read back into several (a big model's are 2GB)
    monkeypatch.setattr("edit2deploy.ops.edit.OFFLOADED_SHARD_SIZE", "10MB")
    offloaded = _edit(
        env,
        env["root"] / "offloaded",
        "cache-offloaded",
        monkeypatch,
        device_map="auto",
        max_memory=max_memory,
    )
    assert [b["steps"] for b in offloaded.batches] == [b["steps"] for b in plain.batches]
    assert len(list(offloaded.out.glob("*.safetensors"))) > 1
    want, got = weights(plain.out), weights(offloaded.out)
    assert sorted(got) == sorted(want)
    edited = {f"model.layers.{li}.mlp.down_proj.weight" for li in LAYERS}
    for name, w in want.items():
        if name in edited:  # only summation orders differ (in memory, frozen linears run through oneDNN)
            assert not torch.equal(w, weights(env["base"])[name])
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6)
        else:  # the offloaded blocks and head written back from disk as they were
            assert torch.equal(got[name], w), name

    reopened = open_model(offloaded.out)  # an ordinary model directory
    assert not hasattr(reopened.model, "hf_device_map")
    assert all(p.device.type == "cpu" for p in reopened.model.parameters())
    for name, p in reopened.model.state_dict().items():
        assert torch.equal(p, got[name]), name


def test_impossible_max_memory_is_a_usage_error(env, tmp_path, monkeypatch):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        UsageError,
        match=r"edited layer 0 \(model\.layers\.0\) would be offloaded to disk.*"
        r"--max-memory cpu=\d+MiB",
    ):
        _edit(env, tmp_path / "out", "cache-none", monkeypatch, device_map="auto", max_memory="cpu=1MiB")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--max-memory needs --device-map auto"):
        open_model(env["base"], max_memory="cpu=1GiB")
    with pytest.raises(UsageError, match="--device-map: 'balanced'"):
        open_model(env["base"], device_map="balanced")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="GPU 0 was named but torch sees 0 CUDA device"):
            open_model(env["base"], device_map="auto", max_memory={0: "1GiB", "cpu": "1GiB"})


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("cpu=2GiB", {"cpu": 2 * 2**30}),
        ("0=20GiB,cpu=60GiB", {0: 20 * 2**30, "cpu": 60 * 2**30}),
        (" cuda:1 = 1.5GB , CPU=512mib", {1: 1_500_000_000, "cpu": 512 * 2**20}),
        ("cpu=4096", {"cpu": 4096}),
    ],
)
def test_parse_max_memory(text, want):
    assert parse_max_memory(text) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cpu", "'cpu' is not DEVICE=SIZE"),
        ("cpu=", "'cpu=' is not DEVICE=SIZE"),
        ("0=1GiB,,cpu=1GiB", "'' is not DEVICE=SIZE"),
        ("gpu0=1GiB", "unknown device 'gpu0'"),
        ("cpu=lots", "size 'lots' for cpu"),
        ("cpu=0GiB", "size '0GiB' for cpu"),
        ("cpu=1GiB,cpu=2GiB", "device 'cpu' given twice"),
    ],
)
def test_bad_max_memory(text, says):
    with pytest.raises(UsageError) as exc:
        parse_max_memory(text)
    assert says in str(exc.value)
    assert str(exc.value).startswith("--max-memory: ")
    assert str(exc.value).endswith("(expected DEVICE=SIZE,... e.g. 0=20GiB,cpu=60GiB)")


def test_cli_bad_max_memory_exits_2_with_one_line(env, tmp_path):
    res = run_cli(
        "edit",
        *("--model", str(env["base"]), "--edits", str(env["edits"]), "--out", str(tmp_path / "out")),
        *("--device-map", "auto", "--max-memory", "cpu=2GiB,disk=9GiB"),
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-memory: unknown device 'disk'" in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_stats_with_a_device_map(env, tmp_path):
    res = run_cli(
        *("stats", "--model", str(env["base"]), "--corpus", str(env["corpus"]), "--n-tokens", "300"),
        *("--layers", "0,1", "--device-map", "auto", "--max-memory", f"cpu={env['budget']}"),
        env={"EDIT2DEPLOY_CACHE": str(tmp_path / "cache")},
    )
    assert res.returncode == 0, res.stderr
    assert "statistics for layers [0, 1] ready" in res.stdout


def test_replay_puts_back_a_forward_of_the_blocks_own():
    """accelerate's hooks are an instance `forward`: replaying lower blocks must not strip them."""
    hooked, plain = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def own(x):
        return x

    hooked.forward = own
    with replay_lower_blocks([hooked, plain], lambda: torch.zeros(1), returns_tuple=False):
        assert hooked(torch.ones(1)).tolist() == [1.0] and plain(torch.ones(1)).tolist() == [0.0]
    assert vars(hooked)["forward"] is own
    assert "forward" not in vars(plain)


def test_run_with_a_device_map_verifies_as_without(env, tmp_path, monkeypatch):
    """`run --device-map auto --max-memory`: the edit, the GGUF and the fp32 references (the edited model and the
    unedited one, opened offloaded too) give the report a run without offload gives."""
    res = {}
    for name, kw in (
        ("plain", {}),
        ("offloaded", {"device_map": "auto", "max_memory": f"cpu={env['budget']}"}),
    ):
        monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / f"cache-{name}"))
        res[name] = run_cli(
            *("run", "--model", str(env["base"]), "--edits", str(env["edits"]), "--targets", "gguf:Q8_0"),
            *("--out", str(tmp_path / name), "--corpus", str(env["corpus"]), "--n-tokens", "1000"),
            *("--layers", "0,1", "--set", "max_steps=3", "--no-baseline", "--no-generation", "--json"),
            *("--gate", "survival=off", "--gate", "specificity_drop=off", "--gate", "efficacy=off"),
            *(f"--{k.replace('_', '-')}={v}" for k, v in kw.items()),
            env={"EDIT2DEPLOY_CACHE": str(tmp_path / f"cache-{name}")},
        )
        assert res[name].returncode == 0, res[name].stderr
    plain, offloaded = (json.loads(res[k].stdout) for k in ("plain", "offloaded"))
    for target, want in zip(offloaded["targets"], plain["targets"], strict=True):
        assert len(target["facts"]) == len(want["facts"]) > 0
        for got_fact, want_fact in zip(target["facts"], want["facts"], strict=True):
            for key in ("margin_fp32", "margin_base_fp32", "margin_artifact"):
                assert got_fact[key] == pytest.approx(want_fact[key], abs=1e-3), (key, got_fact["prompt"])


def test_run_checks_device_map_settings(env, tmp_path):
    from edit2deploy import run

    with pytest.raises(UsageError, match="--max-memory needs --device-map auto"):
        run(str(env["base"]), env["edits"], "gguf:Q8_0", tmp_path / "a", max_memory="cpu=1GiB")
    with pytest.raises(UsageError, match="field 'device_map': expected 'auto'"):
        run(str(env["base"]), env["edits"], "gguf:Q8_0", tmp_path / "b", device_map="balanced")
    with pytest.raises(UsageError, match="--max-memory: unknown device 'disk'"):
        run(
            str(env["base"]),
            env["edits"],
            "gguf:Q8_0",
            tmp_path / "c",
            device_map="auto",
            max_memory="disk=1GiB",
        )
    assert not any(tmp_path.iterdir())


def test_run_hardens_by_default_except_with_a_device_map(tmp_path):
    """`run` hardens every batch against its targets unless told not to (`--no-harden`) or the model is placed
    by `--device-map` (hardening simulates the whole model on one device), where asking for it is an error."""
    from edit2deploy.ops.run import RunConfig, prepare

    edits = tmp_path / "e.jsonl"
    edits.write_text(json.dumps(REQUESTS[0]) + "\n")
    base = {"model": "m", "edits": edits, "targets": "gguf:Q4_K_M", "out": tmp_path / "o"}
    assert prepare(RunConfig(**base)).harden is not None
    assert prepare(RunConfig(**base, harden=False)).harden is None
    assert prepare(RunConfig(**base, device_map="auto")).harden is None
    with pytest.raises(UsageError, match="use --no-harden"):
        prepare(RunConfig(**base, device_map="auto", harden=True))
