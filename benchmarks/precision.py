"""Precision by role on SmolLM2-135M: the model's weights in float32 or bf16, the edits the same?

Edits CounterFact cases in sequential batches (default method, WikiText-2 statistics) once with the weights loaded
in float32 and once in bfloat16 (`--dtype bfloat16`: every tensor bf16 except the edited projections, held and
stored in float32), then scores ES/PS/NS teacher-forced on the written model. A third row takes the bf16 run's
edited projections rounded to bf16, i.e. what storing them in the checkpoint's dtype would have kept: the measure
behind storing them in float32. Peak resident memory and seconds per stage come from the edit's own records.

    cd benchmarks && python precision.py --n 100 --batch-size 25
    cd benchmarks && python precision.py --n 25 --n-tokens 20000          # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import COUNTERFACT, WIKITEXT, machine, print_table, rates_of, write_json

import edit2deploy
from edit2deploy.models import open_model
from edit2deploy.requests import load_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=["val", "train", "edit"])
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="out/precision")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    requests = load_requests(COUNTERFACT / f"counterfact-{args.split}.json", limit=args.n, offset=args.offset)
    rows, doc = [], {"machine": machine(), "n": len(requests), "runs": {}}
    for dtype in args.dtypes.split(","):
        out = Path(args.out) / dtype
        t = time.perf_counter()
        run = edit2deploy.edit(
            "smollm2-135m",
            requests,
            out,
            corpus=WIKITEXT,
            n_tokens=args.n_tokens,
            batch_size=args.batch_size,
            force=True,
            dtype=dtype,
        )
        seconds = time.perf_counter() - t
        lm = open_model(out)
        variants = {dtype: rates_of(lm, requests)}
        if lm.dtype != torch.float32:  # the same edit, its projections stored in the checkpoint's dtype
            for li in range(lm.num_layers):
                w = lm.arch.get_weight(lm.model, li)
                if w.dtype == torch.float32:
                    w.data = w.data.to(lm.dtype).float()
            variants[f"{dtype}, edited layers stored {str(lm.dtype)[6:]}"] = rates_of(lm, requests)
        peaks = run.memory.rss
        for name, r in variants.items():
            rows.append(
                [name, f"{r['ES']:.1f}", f"{r['PS']:.1f}", f"{r['NS']:.1f}", f"{seconds:.0f}",
                 f"{run.stats_seconds:.0f}", f"{peaks.get('load', 0):.0f}", f"{max(peaks.values()):.0f}"]
            )  # fmt: skip
            doc["runs"][name] = {**r, "seconds": seconds, "memory_mib": dict(peaks)}
    print(f"\n{len(requests)} CounterFact {args.split} edits, batches of {args.batch_size}; {machine()}")
    print_table(
        ["weights", "ES", "PS", "NS", "edit s", "statistics s", "peak RSS load MiB", "peak RSS MiB"], rows
    )
    write_json(args.json, doc)


if __name__ == "__main__":
    main()
