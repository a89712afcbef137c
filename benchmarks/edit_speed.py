"""Edit speed on SmolLM2-135M: batched vs one-request-at-a-time z-optimisation, time per phase.

    python benchmarks/edit_speed.py                     # first 50 CounterFact val cases, 2 batches of 25
    python benchmarks/edit_speed.py --n 10 --json out.json

Statistics are computed (or loaded from the cache) first and excluded from edits/s, as in the
reference measurement (ENCORE's released procedure). Both variants edit the same facts from the same unedited model.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import COUNTERFACT, WIKITEXT, machine, print_variants, speed_variants, variant_result, write_json
from reference_procedure import reference_values

from edit2deploy.methods import EditConfig
from edit2deploy.models import open_model
from edit2deploy.ops.edit import apply_requests, prepare_editor
from edit2deploy.ops.settings import parse_layers
from edit2deploy.requests import load_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--layers", default="4-8")
    ap.add_argument("--method", default="default")
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument(
        "--variants",
        default="batched,one-at-a-time",
        help="comma list: batched, one-at-a-time, one-at-a-time-whole-rows, batched-whole-rows, batched-stock-matmul, batched-fp32, no-mpes, reference-procedure",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    requests = load_requests(COUNTERFACT / "counterfact-val.json", limit=args.n)
    base = EditConfig(method=args.method, layers=parse_layers(args.layers))
    variants = {
        **speed_variants(base),
        "reference-procedure": base,  # the reference code's z-optimisation, see reference_procedure.py
    }
    print(f"machine: {machine()}")
    results = []
    for name in args.variants.split(","):
        cfg = variants[name]
        lm = open_model("smollm2-135m", device=args.device)  # fresh, unedited
        editor, ledger, stats_s = prepare_editor(lm, cfg, corpus=WIKITEXT, n_tokens=args.n_tokens, quiet=True)
        if name == "reference-procedure":
            ed = editor
            editor.optimise = lambda reqs, ed=ed: reference_values(
                ed.lm, reqs, ed.templates, ed.layers[-1], ed.cfg.values
            )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        run = apply_requests(editor, ledger, requests, args.batch_size, quiet=True)
        total = time.perf_counter() - t
        results.append({**variant_result(name, run, total, lm, requests), "stats_seconds": stats_s})
        print(f"  {name}: {total:.1f} s", flush=True)
    print()
    print_variants(results)
    write_json(
        args.json, {"results": results, "n": args.n, "batch_size": args.batch_size, "layers": args.layers}
    )


if __name__ == "__main__":
    main()
