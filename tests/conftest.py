"""Shared fixtures: the real SmolLM2-135M (converted once into the user cache) and tiny random models.

Tiny models use SmolLM2's tokenizer (vocab 49,152) so that every family tokenizes the same way;
their weights are random, so they say nothing about facts, only about plumbing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# One intra-op thread (also for CLI subprocesses): the models are small, and on a 2-core machine that is
# running anything else, OpenMP threads spinning for a busy core make scoring ~10x slower. Set
# OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent  # the project root (holds pyproject.toml)
EXAMPLES = ROOT / "examples"
FACTS = EXAMPLES / "facts.jsonl"
COUNTERFACT_VAL = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
VOCAB = 49152  # SmolLM2's tokenizer

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300):
    """`python -m edit2deploy ARGS` in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "edit2deploy", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 and mode of every file under `path` (to prove a directory was not written)."""
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest() + f":{f.stat().st_mode:o}"
    out["<entries>"] = ",".join(sorted(str(p.relative_to(path)) for p in path.rglob("*")))
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (converted once from the wheel's Q4_1 GGUF)."""
    from edit2deploy.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from edit2deploy.models import open_model

    return open_model("smollm2-135m")


def _tiny_config(family: str, hidden: int, ffn: int, layers: int, tok):
    import transformers as tf

    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    heads, kv = 4, 2
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,  # larger than default so logits depend visibly on context
        **ids,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // heads)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(
            **common, head_dim=hidden // heads, sliding_window=16, query_pre_attn_scalar=hidden // heads
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=hidden,
            n_inner=ffn,
            n_layer=layers,
            n_head=heads,
            n_positions=512,
            initializer_range=0.1,
            **ids,
        )
    raise ValueError(f"no tiny config for {family}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Callable[..., Path]:
    """Factory: `tiny_model_dir(family, hidden=64, ffn=128, layers=2, add_bos=False)` -> a saved HF dir.

    Built once per argument set for the session (random weights, fixed seed) and shared: treat the
    directory as read-only (copy it to change it). `add_bos=True` saves a tokenizer that prepends BOS
    (`<|im_start|>`), like Gemma's or Llama's. K-quant GGUF tests need hidden/ffn multiples of 256,
    e.g. `tiny_model_dir("llama", hidden=256, ffn=512)`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built: dict[tuple, Path] = {}

    def make(family: str, hidden: int = 64, ffn: int = 128, layers: int = 2, add_bos: bool = False) -> Path:
        key = (family, hidden, ffn, layers, add_bos)
        if key in built:
            return built[key]
        out = tmp_path_factory.mktemp(f"tiny-{family}-{hidden}-{ffn}-{layers}{'-bos' if add_bos else ''}")
        tok = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=add_bos)
        config = _tiny_config(family, hidden, ffn, layers, tok)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        built[key] = out
        return out

    return make
