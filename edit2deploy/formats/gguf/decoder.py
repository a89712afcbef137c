"""Many sequences decoded together in one llama.cpp context, each in a KV cache stream of its own: the statistics
corpus's sampling (`sampler.py`) and verify's greedy generation (`scorer.LlamaCppScorer.complete_many`) step every
unfinished sequence in one batch instead of one sequence at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .quant import captured_stderr, require_llama_cpp

MAX_STREAMS = 64  # sequences decoded together; beyond it llama.cpp gains nothing on a few CPU cores


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


def greedy_rows(
    dec: StreamDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    done: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy (argmax) continuation ids of each prompt, all decoded together in `dec` (one stream per prompt, at
    most as many prompts as it has streams); a row ends at an end-of-generation token (not kept), at its length,
    or once `done(row, its ids so far)` holds — and leaves the batch, so later steps decode only the rows left."""
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
            if len(out[s]) < max_new_tokens and not (done is not None and done(s, out[s])):
                going.append(s)
        live = going
        if live:
            logits = dec.decode([(out[s][-1], len(prompts[s]) + len(out[s]) - 1, s, True) for s in live])
    return out
