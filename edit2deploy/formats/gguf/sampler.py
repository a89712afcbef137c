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
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .quant import captured_stderr, require_llama_cpp

SAMPLING_QUANT = "Q8_0"
TOP_K = 50
MAX_STREAMS = 64  # sequences decoded together; beyond it llama.cpp gains nothing on a few CPU cores


def all_threads() -> int:
    """Every core this process may use: sampling is the only work running while it lasts."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


class StreamDecoder:
    """A llama.cpp model and context holding `streams` sequences, each in its own KV cache stream."""

    def __init__(
        self,
        path: Path,
        streams: int,
        n_ctx_per_stream: int,
        threads: int,
        kv_type: int | None = None,
        flash_attn: bool | None = None,
    ):
        self.lc = require_llama_cpp().llama_cpp
        lc = self.lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = False  # see scorer.py: repacking crashes on some CPUs
        mp.n_gpu_layers = 0
        with captured_stderr():
            self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        cp = lc.llama_context_default_params()
        cp.n_ctx = streams * n_ctx_per_stream
        cp.n_seq_max = streams
        cp.kv_unified = False  # one stream per sequence: attention reads its own tokens only
        cp.n_batch = cp.n_ubatch = max(512, streams)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if kv_type is not None:  # a GGML type id (llama.cpp's default is F16)
            cp.type_k = cp.type_v = kv_type
        if flash_attn is not None:  # None: llama.cpp's choice (on where the backend has it)
            fa = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.flash_attn_type = fa
        with captured_stderr():
            self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {streams} sequences for {path}")
        self.capacity = cp.n_batch
        self.batch = lc.llama_batch_init(self.capacity, 0, 1)

    def close(self) -> None:
        with captured_stderr():  # llama.cpp reports its buffers as they are freed
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """Evaluate (token, position, sequence, wants logits) items; the logits of those that want them, in order."""
        out: list[np.ndarray] = []
        for s in range(0, len(items), self.capacity):
            part = items[s : s + self.capacity]
            b = self.batch
            b.n_tokens = len(part)
            for i, (token, pos, seq, logits) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
                b.seq_id[i][0] = seq
            rc = self.lc.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama.cpp failed to decode a batch (llama_decode returned {rc})")
            n_out = sum(1 for it in part if it[3])
            if n_out:
                ptr = self.lc.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        return np.concatenate(out) if out else np.empty((0, self.n_vocab), np.float32)


def greedy_rows(dec: StreamDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy (argmax) continuation ids of each prompt, all decoded together in `dec` (one stream per prompt, at
    most as many prompts as it has streams); a row ends at an end-of-generation token (not kept) or its length."""
    lc = dec.lc
    dec.clear()
    logits = dec.decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the rows still generating, in the order of `logits`
    while live and max_new_tokens:
        going = []
        for s, t in zip(live, np.argmax(logits, axis=1).tolist(), strict=True):
            if lc.llama_vocab_is_eog(dec.vocab, t):
                continue
            out[s].append(t)
            if len(out[s]) < max_new_tokens:
                going.append(s)
        live = going
        if live:
            logits = dec.decode([(out[s][-1], len(prompts[s]) + len(out[s]) - 1, s, True) for s in live])
    return out


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
    dec = StreamDecoder(Path(path), streams, longest + new_tokens + 1, threads or all_threads())
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
