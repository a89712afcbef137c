"""Precision by role on SmolLM2-135M: the model's weights in float32 or bf16, the edits the same?

Edits CounterFact cases in sequential batches (default method, WikiText-2 statistics) once with the weights loaded
in float32 and once in bfloat16 (`--dtype bfloat16`: every tensor bf16 except the edited projections, held and
stored in float32), then scores ES/PS/NS teacher-forced on the written model. A third row takes the bf16 run's
edited projections rounded to bf16, i.e. what storing them in the checkpoint's dtype would have kept: the measure
behind storing them in float32. Each precision's unedited model is scored too (rounding SmolLM2 to bf16 moves it).

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


def scores(lm, requests) -> dict:
    """ES / PS / NS (0-100) and the mean margin log p(new) − log p(true) on the edit prompts."""
    from edit2deploy.probes import probes_for, run_probes
    from edit2deploy.scoring import TorchScorer

    rates = rates_of(lm, requests)
    edit = [
        r.margin for r in run_probes(TorchScorer(lm.model, lm.tokenizer), probes_for(requests, ("edit",)))
    ]
    return {**rates, "margin": sum(edit) / len(edit)}


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
        edit2deploy.edit(
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
        variants = {f"{dtype}, unedited": scores(open_model("smollm2-135m", dtype=dtype), requests)}
        lm = open_model(out)
        variants[f"{dtype}, edited"] = scores(lm, requests)
        if lm.dtype != torch.float32:  # the same edit, its projections stored in the checkpoint's dtype
            for li in range(lm.num_layers):
                w = lm.arch.get_weight(lm.model, li)
                if w.dtype == torch.float32:
                    w.data = w.data.to(lm.dtype).float()
            variants[f"{dtype}, edited, projections stored {str(lm.dtype)[6:]}"] = scores(lm, requests)
        for name, r in variants.items():
            rows.append([name, *(f"{r[k]:.1f}" for k in ("ES", "PS", "NS")), f"{r['margin']:.3f}",
                         "" if "unedited" in name else f"{seconds:.0f}"])  # fmt: skip
            doc["runs"][name] = {**r, "edit_seconds": seconds}
    print(f"\n{len(requests)} CounterFact {args.split} edits, batches of {args.batch_size}; {machine()}")
    print_table(["weights", "ES", "PS", "NS", "mean edit-prompt margin (nats)", "edit s"], rows)
    write_json(args.json, doc)


if __name__ == "__main__":
    main()
