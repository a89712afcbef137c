"""How fast the model writes its own statistics corpus (the offline default, `stats.generated_token_chunks`), by
sampling batch size: the first edit of a new model waits for this.

    cd benchmarks && python corpus_speed.py                          # batches 32 (today), 64, 128; 64-token rows
    cd benchmarks && python corpus_speed.py --seq-len 256 --batches 32,128
"""

from __future__ import annotations

import argparse
import time

from _common import machine, print_table

from edit2deploy.models import open_model
from edit2deploy.stats import generated_token_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row (the corpus uses 256)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    lm = open_model(args.model, dtype=args.dtype)
    rows = []
    for batch in map(int, args.batches.split(",")):
        t = time.perf_counter()
        chunks = generated_token_chunks(
            lm, batch * args.seq_len, seq_len=args.seq_len, batch=batch, quiet=True
        )
        seconds = time.perf_counter() - t
        n = sum(map(len, chunks))
        rows.append([batch, n, f"{seconds:.1f}", f"{n / seconds:.0f}", f"{100_000 / (n / seconds):.0f}"])
    print(f"\n{args.model} ({args.dtype}), rows of {args.seq_len} tokens; {machine()}")
    print_table(["batch", "tokens", "seconds", "tokens/s", "s per 100k tokens"], rows)


if __name__ == "__main__":
    main()
