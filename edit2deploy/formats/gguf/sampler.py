"""Sampling text in llama.cpp: the statistics corpus of a model's first edit on a CPU, written at llama.cpp's speed.

A model with no statistics yet writes its own corpus (`stats.generated_token_chunks`). On a CPU, torch samples it at
~100–150 tokens/s for SmolLM2-135M on 2 cores, which dominated a first edit; llama.cpp decoding many sequences at
once (one KV cache stream per sequence) samples the same model, converted to Q8_0 (near-lossless) for the purpose,
about twice as fast (benchmarks/RESULTS.md, 5.3). The GGUF is written to a temporary folder under the cache and
removed afterwards: a model's corpus is sampled once, then its statistics are cached.

Sampling is top-k (k = 50) from the softmax of the full logits, drawn with numpy's PCG64 seeded by `seed`, so a
run is reproducible on one machine (llama.cpp's matrix products may differ across CPUs).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..threads import exclusive_threads
from .decoder import MAX_STREAMS, StreamDecoder
from .quant import require_llama_cpp

SAMPLING_QUANT = "Q8_0"
TOP_K = 50


def top_k_draw(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of `logits` (rows × vocabulary), drawn from the softmax of the row's k largest."""
    k = min(k, logits.shape[1])
    top = np.argpartition(logits, -k, axis=1)[:, -k:]
    z = np.take_along_axis(logits, top, axis=1).astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((logits.shape[0], 1))
    pick = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), k - 1)
    return top[np.arange(len(top)), pick]


def sample_rows(
    path: Path | str,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    seed: int = 0,
    streams: int = MAX_STREAMS,
    threads: int | None = None,
    quiet: bool = False,
) -> list[list[int]]:
    """`new_tokens` sampled token ids after each prompt (top-k 50), decoded `streams` prompts at a time."""
    rng = np.random.default_rng(seed)
    streams = max(1, min(streams, len(prompts)))
    longest = max((len(p) for p in prompts), default=0)
    dec = StreamDecoder(Path(path), streams, longest + new_tokens + 1, threads or exclusive_threads())
    rows: list[list[int]] = []
    bar = tqdm(total=len(prompts) * new_tokens, desc="generating corpus", unit="tok", disable=quiet)
    try:
        for start in range(0, len(prompts), streams):
            group = [list(p) for p in prompts[start : start + streams]]
            dec.clear()
            logits = dec.decode(
                [(t, i, s, i == len(p) - 1) for s, p in enumerate(group) for i, t in enumerate(p)]
            )
            pos = [len(p) for p in group]
            out: list[list[int]] = [[] for _ in group]
            for step in range(new_tokens):
                ids = top_k_draw(logits, TOP_K, rng)
                for s, t in enumerate(ids.tolist()):
                    out[s].append(t)
                bar.update(len(group))
                if step + 1 == new_tokens:
                    break
                logits = dec.decode([(out[s][-1], pos[s] + step, s, True) for s in range(len(group))])
            rows.extend(out)
    finally:
        bar.close()
        dec.close()
    return rows


@contextlib.contextmanager
def sampling_gguf(model_dir: Path | str, scratch: Path | str) -> Iterator[Path]:
    """The model at `model_dir` as a Q8_0 GGUF in a temporary folder under `scratch`, removed on exit."""
    from .export import export

    Path(scratch).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sampler-", dir=scratch))
    try:
        art = export(model_dir, folder / f"model-{SAMPLING_QUANT}.gguf", SAMPLING_QUANT)
        yield art.path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sampler_for(model_dir: Path | str, scratch: Path | str) -> LlamaCppSampler | None:
    """A llama.cpp sampler for the model, or None where llama-cpp-python is missing or GGUF has no such family."""
    from edit2deploy.errors import UsageError

    from .arch import ModelLayout

    try:
        require_llama_cpp()
        ModelLayout.open(model_dir)
    except UsageError:
        return None
    return LlamaCppSampler(model_dir, scratch)


class LlamaCppSampler:
    """A `stats.RowSampler`: converts the model to GGUF when first asked for text, then samples in llama.cpp."""

    name = "llama.cpp"

    def __init__(self, model_dir: Path | str, scratch: Path | str, threads: int | None = None):
        self.model_dir, self.scratch, self.threads = Path(model_dir), Path(scratch), threads

    def __call__(
        self, prompts: Sequence[Sequence[int]], new_tokens: int, seed: int, quiet: bool
    ) -> list[list[int]]:
        with sampling_gguf(self.model_dir, self.scratch) as path:
            return sample_rows(path, prompts, new_tokens, seed=seed, threads=self.threads, quiet=quiet)
