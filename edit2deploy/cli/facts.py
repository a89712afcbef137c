"""`edit2deploy facts`: score facts on a model."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from .common import json_safe, positive, print_table


def add_facts(sub) -> Callable:
    p = sub.add_parser("facts", help="score facts on a model: p(target) vs p(true), top-1 token")
    p.add_argument("--model", required=True, help="HF directory, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument(
        "--facts", required=True, help="edit/fact file: .jsonl (ours) or CounterFact/EasyEdit .json"
    )
    p.add_argument("--limit", type=positive, default=None, help="only the first N records")
    p.add_argument(
        "--probes",
        default="edit",
        help="which prompts to score: comma list of edit,paraphrase,neighborhood (default: edit)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return cmd_facts


def _p(lp: float | None) -> str:
    return "-" if lp is None else f"{math.exp(lp):.3f}"


def cmd_facts(args: argparse.Namespace) -> int:
    from ..ops.facts import score_facts

    results, summary = score_facts(args.model, args.facts, args.probes, args.limit, args.device)
    if args.json:
        doc = {"model": args.model, "facts": [r.to_json() for r in results], "rates": summary}
        json.dump(json_safe(doc), sys.stdout, indent=1, allow_nan=False)
        print()
        return 0
    rows = []
    for r in results:
        pr = r.probe
        if pr.kind == "neighborhood":
            wins = "true" if r.success else "new"
        else:
            wins = "target" if r.success else ("true" if pr.other is not None else "-")
        rows.append(
            [
                pr.request_id,
                pr.kind,
                pr.prompt,
                pr.expected,
                _p(r.lp_expected),
                pr.other or "-",
                _p(r.lp_other),
                wins,
                repr(r.top1),
            ]
        )
    print_table(["id", "kind", "prompt", "target", "p(target)", "other", "p(other)", "wins", "top-1"], rows)
    print()
    print(
        "  ".join(f"{k}: {v:.1f}%" for k, v in summary.items() if v is not None)
        + "   (p = per-token geometric mean for multi-token answers)"
    )
    return 0
