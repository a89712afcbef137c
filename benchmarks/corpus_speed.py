"""How fast the model writes its own statistics corpus (the offline default, `stats.generated_token_chunks`), by
sampler and batch: the first edit of a new model waits for this.

Samplers: `torch:N` (transformers' generate, N rows at once; 32 was the setting before issue 30, `torch:auto` is
`stats.sampling_batch`) and `llama.cpp:N` (`formats/gguf/sampler.py`, N sequences decoded together; the time
includes writing the model's Q8_0 GGUF, which `llama.cpp+export` reports apart).

    cd benchmarks && python corpus_speed.py                       # 20,000 tokens, the demo's corpus
    cd benchmarks && python corpus_speed.py --samplers torch:32,llama.cpp:64 --n-tokens 8192
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial

from _common import machine, print_table

from edit2deploy.formats.gguf.sampler import LlamaCppSampler, sample_rows, sampling_gguf
from edit2deploy.models import open_model
from edit2deploy.stats import generated_token_chunks, sampling_batch


class _Streams(LlamaCppSampler):
    """`LlamaCppSampler` with a given number of streams."""

    def __init__(self, model_dir, scratch, streams: int):
        super().__init__(model_dir, scratch)
        self.streams = streams

    def __call__(self, prompts, new_tokens, seed, quiet):
        t = time.perf_counter()
        with sampling_gguf(self.model_dir, self.scratch) as path:
            self.export_seconds = time.perf_counter() - t
            return sample_rows(path, prompts, new_tokens, seed=seed, streams=self.streams, quiet=quiet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samplers", default="torch:32,torch:auto,llama.cpp:32,llama.cpp:64")
    ap.add_argument("--n-tokens", type=int, default=20_000)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (the corpus uses 256)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    lm = open_model(args.model, dtype=args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.samplers.split(","):
            kind, _, size = spec.partition(":")
            export_s = None
            if kind == "torch":
                batch = sampling_batch(lm, args.seq_len) if size == "auto" else int(size)
                run = partial(generated_token_chunks, batch=batch)
                label = f"torch, {batch} rows"
            elif kind == "llama.cpp":
                sampler = _Streams(lm.model_dir, scratch, int(size))
                run = partial(generated_token_chunks, sampler=sampler)
                label = f"llama.cpp, {size} sequences"
            else:
                raise SystemExit(f"--samplers: unknown sampler {spec!r} (torch:N, torch:auto, llama.cpp:N)")
            t = time.perf_counter()
            chunks = run(lm, args.n_tokens, seq_len=args.seq_len, quiet=True)
            seconds = time.perf_counter() - t
            if kind == "llama.cpp":
                export_s = sampler.export_seconds
            n = sum(map(len, chunks))
            sampling = seconds - (export_s or 0.0)
            rows.append([label, n, f"{seconds:.1f}", "" if export_s is None else f"{export_s:.1f}",
                         f"{n / sampling:.0f}", f"{n / seconds:.0f}"])  # fmt: skip
    print(f"\n{args.model} ({args.dtype}), rows of {args.seq_len} tokens; {machine()}")
    print_table(["sampler", "tokens", "seconds", "of which GGUF export", "tokens/s sampling", "tokens/s overall"],
                rows)  # fmt: skip


if __name__ == "__main__":
    main()
