"""`edit2deploy rollback` and `edit2deploy log`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ..errors import UsageError
from .common import print_table


def add_rollback(sub) -> Callable:
    p = sub.add_parser("rollback", help="undo edit batches exactly (bit for bit)")
    p.add_argument("--model", required=True, help="an edited model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--last", type=int, help="undo the last N batches")
    g.add_argument("--batch", help="undo one named batch (see `edit2deploy log`)")
    p.add_argument("--out", default=None, help="write the result here instead of in place")
    return cmd_rollback


def cmd_rollback(args: argparse.Namespace) -> int:
    from ..ledger import rollback

    res = rollback(args.model, last=args.last, batch=args.batch, out=args.out)
    verified = [v for v in res["verified"].values() if v is not None]
    print(
        f"removed {', '.join(res['removed'])}; active now: {', '.join(res['kept']) or 'none (original weights)'}"
    )
    if verified:
        print(f"{sum(verified)}/{len(verified)} edited tensors match their recorded SHA-256 bit for bit")
    else:
        print("restored state was never recorded (a batch in the middle was removed); not hash-checked")
    return 0


def add_log(sub) -> Callable:
    p = sub.add_parser("log", help="list the edit ledger of an edited model")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    return cmd_log


def cmd_log(args: argparse.Namespace) -> int:
    from ..ledger import Ledger

    ledger = Ledger.load(args.model)
    if ledger is None:
        raise UsageError(f"{args.model}: no edit ledger (not written by `edit2deploy edit`)")
    if args.json:
        print(json.dumps({"state": ledger.state, "records": ledger.records}, indent=1))
        return 0
    active = set(ledger.active_batches)
    rows = []
    for r in ledger.records:
        if r.get("type") == "batch":
            norms = " ".join(f"{v['fro_from_original']:.2f}" for v in r["tensors"].values())
            rows.append(
                [
                    r["id"],
                    "active" if r["id"] in active else "rolled back",
                    r["time"],
                    r["method"],
                    len(r["requests"]),
                    f"{r['seconds']:.1f}",
                    norms,
                ]
            )
        else:
            rows.append(
                [
                    r.get("type"),
                    "",
                    r.get("time", ""),
                    "",
                    "",
                    "",
                    json.dumps({k: v for k, v in r.items() if k not in ("type", "time")}),
                ]
            )
    print(f"base model: {ledger.state['base_model']}   edited tensors: {len(ledger.state['edited_tensors'])}")
    print_table(["batch", "status", "time", "method", "edits", "seconds", "‖W−W0‖_F per layer"], rows)
    return 0
