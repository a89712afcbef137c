"""`edit2deploy predict`: per-fact survival of deployment targets, predicted in torch before exporting."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from ..formats import DEFAULT_PROTECTION
from .common import positive, print_table


def add_predict(sub) -> Callable:
    p = sub.add_parser(
        "predict",
        help="predict, in torch, which fact verdicts survive a quantized deployment (before exporting)",
        description="Simulate a target's quantization of every weight (its exact block math) in torch and score "
        "the fact suite on it: per-fact predicted verdicts vs full precision.",
    )
    p.add_argument(
        "--model", required=True, help="an edited HF directory (its ledger gives the facts), or any model"
    )
    p.add_argument(
        "--targets",
        "--quant",
        dest="targets",
        required=True,
        help="comma list of FORMAT:TYPE[:PROTECTION] (a bare TYPE names the one format that has it): "
        "Q4_K_M, gguf:Q8_0, onnx:int4, bnb:nf4:none",
    )
    p.add_argument(
        "--protect-edits", default=DEFAULT_PROTECTION.value, help="none | q8_0 | f16 (as for export)"
    )
    p.add_argument("--patch", default=None, help="gguf: predict a patch export over this base .gguf")
    p.add_argument("--edits", default=None, help="facts to check (default: the model's ledger)")
    p.add_argument("--preserved", default=None, help="extra unedited facts that must keep their answer")
    p.add_argument("--preserved-n", type=positive, default=None, help="only the first N preserved facts")
    p.add_argument("--limit", type=positive, default=None, help="only the first N edit records")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--all", action="store_true", help="list every fact (default: only predicted flips)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return cmd_predict


def cmd_predict(args: argparse.Namespace) -> int:
    from ..ops.predict import predict

    docs = []

    def show(pred, seconds: float) -> None:
        docs.append({**pred.to_json(), "seconds": seconds})
        if not args.json:
            print_prediction(pred, show_all=args.all, seconds=seconds)

    predict(
        args.model,
        args.targets,
        args.edits,
        protect_edits=args.protect_edits,
        preserved=args.preserved,
        patch=args.patch,
        limit=args.limit,
        preserved_n=args.preserved_n,
        device=args.device,
        on_each=show,
    )
    if args.json:
        json.dump({"model": str(args.model), "predictions": docs}, sys.stdout, indent=1)
        print()
    return 0


def print_prediction(pred, show_all: bool = False, seconds: float | None = None) -> None:
    from ..probes import EDITED_KINDS, PRESERVED_KINDS

    def m(x: float) -> str:
        return f"{x:+.2f}" if math.isfinite(x) else "-"

    rows = []
    for r in pred.rows:
        if not show_all and r.survives:
            continue
        rows.append(
            [
                r.probe.kind,
                r.probe.request_id,
                r.probe.prompt[:60],
                r.probe.expected,
                m(r.fp32.margin),
                m(r.predicted.margin),
                "ok" if r.fp32.success else "fail",
                "ok" if r.predicted.success else "fail",
                "" if r.survives else "FLIPS",
            ]
        )
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    print(f"\n== {pred.target}: predicted in torch{took}")
    if rows:
        print_table(
            ["kind", "id", "prompt", "expected", "margin fp32", "margin pred", "fp32", "pred", ""], rows
        )
    else:
        print("no fact is predicted to flip")
    surv = {
        k: pred.survival(kinds)
        for k, kinds in (
            ("all", None),
            ("edited", EDITED_KINDS),
            ("preserved", PRESERVED_KINDS),
        )
    }
    print(
        "predicted survival: "
        + ", ".join(f"{k} {v * 100:.1f}%" for k, v in surv.items() if v is not None)
        + f"   ({len(pred.rows)} probes; margins in nats/token, expected − other)"
    )
