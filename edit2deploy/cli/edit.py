"""`edit2deploy edit` and `edit2deploy stats`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable

from ..errors import UsageError
from ..formats import DEFAULT_PROTECTION
from .common import add_device_map, add_dtype, add_set, count, non_negative, positive, print_table


def add_edit(sub) -> Callable:
    p = sub.add_parser("edit", help="apply an edit file to a model; writes a patched HF directory + ledger")
    p.add_argument(
        "--model", required=True, help="HF directory (or an earlier edit's --out), .gguf, or built-in name"
    )
    p.add_argument("--edits", required=True, help="edit file: .jsonl (ours) or CounterFact/EasyEdit .json")
    p.add_argument("--out", required=True, help="output directory (appears only when complete)")
    p.add_argument("--method", default=None, help="default | alphaedit | encore | memit (default: default)")
    p.add_argument(
        "--layers", default=None, help="edited layers, e.g. 4-8 or 4,5,6 (default: per architecture)"
    )
    p.add_argument(
        "--batch-size",
        type=positive,
        default=None,
        help="sequential batches of this size (default: all at once)",
    )
    p.add_argument(
        "--corpus", default=None, help="text file or directory for key statistics (default: model-generated)"
    )
    p.add_argument(
        "--n-tokens", type=positive, default=None, help="tokens of statistics corpus (default 30,000)"
    )
    p.add_argument("--config", default=None, help="TOML file with an [edit] table of hyperparameters")
    add_set(p)
    p.add_argument(
        "--preserved",
        default=None,
        help="facts that must not change (same formats as --edits): their keys leave the null space "
        "(alphaedit/default; with a model's first edits)",
    )
    p.add_argument("--preserved-n", type=positive, default=None, help="only the first N preserved facts")
    p.add_argument(
        "--retry-rounds",
        type=count,
        default=None,
        help="re-solve each batch up to N more times for edits that did not take (default 0)",
    )
    p.add_argument("--limit", type=positive, default=None, help="only the first N requests")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_device_map(p)
    add_dtype(p)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    h = p.add_argument_group("quantization-aware hardening")
    h.add_argument(
        "--harden-for",
        default=None,
        help="targets the edits must survive, e.g. Q4_K_M,onnx:int4,bnb:nf4 (FORMAT:TYPE:none for "
        "unprotected export); facts predicted to flip are re-optimised and the batch re-solved",
    )
    h.add_argument(
        "--harden-protect-edits",
        default=DEFAULT_PROTECTION.value,
        help="protection the targets will be exported with",
    )
    h.add_argument(
        "--harden-margin",
        type=non_negative,
        default=None,
        help="nats/token the target must win by (default 1.0)",
    )
    h.add_argument(
        "--harden-rounds", type=positive, default=None, help="re-solve rounds per batch (default 3)"
    )
    h.add_argument(
        "--harden-risk",
        type=non_negative,
        default=None,
        help="also harden facts predicted to win by less than this many nats/token (default 0.5)",
    )
    h.add_argument(
        "--harden-specificity",
        type=non_negative,
        default=None,
        help="most neighbourhood points a round may cost before it is undone (default 5)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    return cmd_edit


def hardening(args: argparse.Namespace):
    """(scheme factories, HardenConfig) from the --harden-* flags (empty when not asked for)."""
    from ..formats import parse_targets
    from ..methods.harden import HardenConfig
    from ..ops.predict import scheme_factories

    tuning = {
        "margin": args.harden_margin,
        "rounds": args.harden_rounds,
        "specificity_limit": args.harden_specificity,
        "risk": args.harden_risk,
    }
    if not args.harden_for:
        if any(v is not None for v in tuning.values()):
            raise UsageError(
                "--harden-margin/--harden-rounds/--harden-specificity/--harden-risk need --harden-for"
            )
        return (), None
    targets = parse_targets(args.harden_for, args.harden_protect_edits, "--harden-for")
    cfg = HardenConfig(**{k: v for k, v in tuning.items() if v is not None})
    if cfg.margin <= 0 or not math.isfinite(cfg.margin):
        raise UsageError(f"--harden-margin: expected a positive number, got {cfg.margin}")
    return scheme_factories(targets), cfg


def cmd_edit(args: argparse.Namespace) -> int:
    """Also runs as N processes under `torchrun --nproc-per-node N -m edit2deploy edit ...`: the ranks share each
    batch's z-optimisation, rank 0 solves and broadcasts ΔW (`ops.edit.edit_model`); rank 0 alone writes --out,
    shows progress and prints."""
    from .. import distributed
    from ..models import check_device, check_max_memory
    from ..ops.edit import edit_model
    from ..ops.settings import edit_config
    from ..requests import load_requests

    if args.preserved_n is not None and not args.preserved:
        raise UsageError("--preserved-n needs --preserved")
    schemes, harden = hardening(args)
    cfg = edit_config(
        args.config, args.set, method=args.method, layers=args.layers, retry_rounds=args.retry_rounds
    )
    preserved = load_requests(args.preserved, limit=args.preserved_n) if args.preserved else ()
    check_device(distributed.rank_device(args.device))  # a usage error before any process group starts
    max_memory = check_max_memory(args.max_memory)
    with distributed.process_group(args.device) as device:
        if not distributed.is_main():
            warnings.filterwarnings("ignore")  # the same warnings as rank 0's: the user reads them once
        run = edit_model(
            args.model,
            args.edits,
            args.out,
            cfg=cfg,
            batch_size=args.batch_size,
            corpus=args.corpus,
            n_tokens=args.n_tokens,
            device=device,
            force=args.force,
            limit=args.limit,
            quiet=getattr(args, "quiet", False),
            harden_for=schemes,
            harden=harden,
            preserved=preserved,
            dtype=args.dtype,
            device_map=args.device_map,
            max_memory=max_memory,
        )
        processes = distributed.world_size()
        if not distributed.is_main():
            return 1 if run.failed else 0
    n = sum(len(b["requests"]) for b in run.batches)
    summary = {
        "out": str(run.out) if run.out else None,
        "batches": [
            {
                "id": b["id"],
                "requests": len(b["requests"]),
                "seconds": b["seconds"],
                "timings": b["timings"],
                "fro_from_original": {k: v["fro_from_original"] for k, v in b["tensors"].items()},
                **({"retry": b["retry"]} if "retry" in b else {}),
            }
            for b in run.batches
        ],
        "edits": n,
        "seconds": round(run.seconds, 2),
        "stats_seconds": round(run.stats_seconds, 2),
        "failed": run.failed,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        rows = [
            [
                b["id"],
                len(b["requests"]),
                f"{b['seconds']:.1f}",
                " ".join(f"{k}={v:.1f}" for k, v in b["timings"].items()),
                " ".join(f"{v['fro_from_original']:.2f}" for v in b["tensors"].values()),
            ]
            for b in run.batches
        ]
        print_table(["batch", "edits", "seconds", "phases (s)", "‖W−W0‖_F per layer"], rows)
        if n:
            across = f", {processes} processes" if processes > 1 else ""
            print(
                f"\n{n} edits in {run.seconds:.1f} s ({run.seconds / n:.2f} s/edit; statistics "
                f"{run.stats_seconds:.1f} s{across})"
            )
        for b in run.batches:
            if "retry" in b:
                print_retry(b["id"], b["retry"])
            if "hardening" in b:
                print_hardening(b["id"], b["hardening"])
        if run.out:
            print(f"wrote {run.out}")
    if run.failed:
        print(
            f"edit2deploy: batch {run.failed['batch']} was not applied: {run.failed['error']}",
            file=sys.stderr,
        )
        return 1
    return 0


def print_retry(batch_id: str, rec: dict) -> None:
    """What the retry rounds of one batch did: how many edits each round re-solved, which still fail."""
    tried = ", ".join(str(len(r["retried"])) for r in rec["rounds"]) or "none needed"
    line = f"retry {batch_id}: edits re-solved per round: {tried}; still failing: {len(rec['failed'])}"
    if rec["failed"]:
        line += " (" + ", ".join(rec["failed"][:10]) + (", ..." if len(rec["failed"]) > 10 else "") + ")"
    print(line)


def print_hardening(batch_id: str, rec: dict) -> None:
    """One line per target: predicted edited-fact survival and neighbourhood before → after hardening."""

    def pct(x):
        return "-" if x is None else f"{x * 100:.1f}%"

    def pts(x):
        return "-" if x is None else f"{x:.1f}"

    rounds = rec.get("rounds", [])
    n = sum(len(r["hardened"]) for r in rounds)
    print(
        f"\nhardening {batch_id}: {len(rounds)} round(s), {n} re-optimisation(s)"
        + (f"; {rounds[-1]['undone']}" if rounds and "undone" in rounds[-1] else "")
    )
    rows = []
    before, after = rec["before"], rec["after"]
    for t in rec["targets"]:
        rows.append(
            [
                t,
                f"{pct(before[t]['edited_survival'])} → {pct(after[t]['edited_survival'])}",
                f"{pts(before[t]['neighborhood'])} → {pts(after[t]['neighborhood'])}",
            ]
        )
    rows.append(["fp32", "", f"{pts(before['fp32']['neighborhood'])} → {pts(after['fp32']['neighborhood'])}"])
    print_table(["target (simulated)", "edited-fact survival", "neighbourhood"], rows)
    if rec.get("remaining_flips"):
        print(f"still predicted to flip: {', '.join(rec['remaining_flips'])}")


def add_stats(sub) -> Callable:
    p = sub.add_parser("stats", help="precompute key statistics (C = E[k kᵀ]) for the edited layers")
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", default=None, help="text file or directory (default: model-generated text)")
    p.add_argument("--n-tokens", type=positive, default=None, help="default 30,000")
    p.add_argument("--layers", default=None, help="default: the architecture's edited layers")
    p.add_argument("--device", default="cpu")
    add_device_map(p)
    add_dtype(p)
    return cmd_stats


def cmd_stats(args: argparse.Namespace) -> int:
    """Also runs as N processes under `torchrun --nproc-per-node N -m edit2deploy stats ...`: the ranks share the
    forward pass (`distributed`); rank 0 alone writes the cache, shows progress and prints."""
    from .. import distributed
    from ..models import check_device, check_max_memory, resolve_model_dir
    from ..ops.edit import compute_stats
    from ..ops.settings import parse_layers

    layers = parse_layers(args.layers) if args.layers else None
    check_device(distributed.rank_device(args.device))  # a usage error before any process group starts
    max_memory = check_max_memory(args.max_memory)
    with distributed.process_group(args.device) as device:
        main = distributed.is_main()
        if not main:
            warnings.filterwarnings("ignore")  # the same warnings as rank 0's: the user reads them once
        if distributed.world_size() > 1:
            # a built-in name or a .gguf is converted into the cache on first use: rank 0 converts, the others
            # wait (N ranks converting into the same cache entry at once would replace it under each other)
            if main:
                resolve_model_dir(args.model)
            distributed.barrier()
        stats, corpus_id, seconds = compute_stats(
            args.model,
            args.corpus,
            args.n_tokens,
            layers,
            device,
            quiet=getattr(args, "quiet", False) or not main,
            dtype=args.dtype,
            device_map=args.device_map,
            max_memory=max_memory,
        )
        if main:
            print_table(
                ["layer", "d_in", "tokens"], [[li, s.C.shape[0], s.n_tokens] for li, s in stats.items()]
            )
            processes = f", {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
            print(
                f"\nstatistics for layers {list(stats)} ready in {seconds:.1f} s (corpus {corpus_id}{processes})"
            )
    return 0
