"""The generated statistics corpus sampled in llama.cpp (`formats/gguf/sampler.py`): top-k draws, the real model's
text, reproducible rows, and when the torch sampler is used instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edit2deploy.errors import UsageError
from edit2deploy.formats.gguf import sampler as sampler_mod
from edit2deploy.formats.gguf.sampler import LlamaCppSampler, top_k_draw
from edit2deploy.models import open_model
from edit2deploy.ops.edit import statistics_corpus
from edit2deploy.scoring import document_start
from edit2deploy.stats import GENERATED_CORPUS_ID, GENERATION_SEEDS, generated_token_chunks


def test_top_k_draw_follows_the_softmax_of_the_k_largest():
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -5.0, 2.5]], dtype=np.float32)
    rng = np.random.default_rng(0)
    draws = np.concatenate([top_k_draw(np.repeat(logits, 1000, 0), 3, rng) for _ in range(20)])
    assert set(draws.tolist()) <= {1, 3, 5}  # the three largest only
    top = np.array([3.0, 2.0, 2.5])
    want = np.exp(top) / np.exp(top).sum()
    got = np.array([(draws == i).mean() for i in (1, 3, 5)])
    np.testing.assert_allclose(got, want, atol=0.015)
    assert top_k_draw(logits, 1, rng).tolist() == [1]  # k = 1 is greedy
    again = [top_k_draw(np.repeat(logits, 50, 0), 3, np.random.default_rng(7)).tolist() for _ in range(2)]
    assert again[0] == again[1]


@pytest.mark.slow
def test_llama_cpp_writes_smollm2s_own_text_reproducibly(smollm2, tmp_path):
    """The rows start at their seed word, have the asked length, repeat for a seed, and are the model's text: the
    sampled tokens are among fp32 torch's 50 most likely (top-k 50 of a Q8_0 copy)."""
    corpus = statistics_corpus(None, smollm2)
    assert corpus.id == GENERATED_CORPUS_ID and isinstance(corpus.sampler, LlamaCppSampler)
    sampler = LlamaCppSampler(smollm2.model_dir, tmp_path)
    rows = generated_token_chunks(smollm2, 400, seq_len=40, quiet=True, sampler=sampler)
    assert sum(map(len, rows)) == 400
    seeds = [smollm2.tokenizer(w)["input_ids"] for w in GENERATION_SEEDS]
    for i, row in enumerate(rows[:-1]):
        assert row[: len(seeds[i])] == seeds[i] and len(row) == len(seeds[i]) + 40
    assert rows == generated_token_chunks(smollm2, 400, seq_len=40, quiet=True, sampler=sampler)
    assert rows != generated_token_chunks(smollm2, 400, seq_len=40, seed=1, quiet=True, sampler=sampler)
    assert not list(tmp_path.iterdir())  # the temporary GGUF is gone

    start = document_start(smollm2.tokenizer)
    inside = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([start + row])
            logits = smollm2.model(ids).logits[0, :-1]
            top = logits.topk(50, dim=-1).indices
            first = len(start) + len(seeds[rows.index(row)]) - 1  # the positions predicting sampled tokens
            hits = (top[first:] == ids[0, first + 1 :, None]).any(-1)
            inside.extend(hits.tolist())
    assert np.mean(inside) >= 0.97, np.mean(inside)


def test_torch_samples_where_llama_cpp_cannot(tiny_model_dir, tmp_path, monkeypatch):
    lm = open_model(tiny_model_dir("llama"))
    assert isinstance(statistics_corpus(None, lm).sampler, LlamaCppSampler)
    text = tmp_path / "corpus.txt"
    text.write_text("Some text.\n")
    assert statistics_corpus(text, lm).sampler is None  # a text corpus is read, not sampled

    def missing():
        raise UsageError("this needs llama-cpp-python")

    monkeypatch.setattr(sampler_mod, "require_llama_cpp", missing)
    corpus = statistics_corpus(None, lm)
    assert corpus.sampler is None and corpus.id == GENERATED_CORPUS_ID
