"""`edit2deploy run` (edits → verified artifacts in one command) and `edit2deploy demo`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..errors import UsageError
from ..ops.demo import DEMO_MODEL, DEMO_N_TOKENS
from .common import add_device_map, add_dtype, add_no_generation, add_set, positive, print_table

FLAG_FIELDS = (  # [run] fields that have a flag of the same name
    "model",
    "edits",
    "targets",
    "out",
    "batch_size",
    "corpus",
    "n_tokens",
    "preserved",
    "preserved_n",
    "heldout",
    "protect_edits",
    "device",
    "dtype",
    "device_map",
    "max_memory",
)


# ---------------------------------------------------------------- run
def add_run(sub) -> Callable:
    p = sub.add_parser(
        "run",
        help="edit → export every target → verify each in its runtime → report.{json,md,html} (one command)",
    )
    p.add_argument("--model", default=None, help="HF directory, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("--edits", default=None, help="edit file: .jsonl (ours) or CounterFact/EasyEdit .json")
    p.add_argument(
        "--targets",
        default=None,
        help="comma list of FORMAT:TYPE[:PROTECTION], e.g. gguf:Q4_K_M,gguf:Q8_0,onnx:int4:none",
    )
    p.add_argument(
        "--out", default=None, help="output directory (model/, artifacts/, report.*); reruns reuse it"
    )
    p.add_argument(
        "--config",
        default=None,
        help="TOML file: [run] model, edits, targets, out, gates, ...; [edit] hyperparameters",
    )
    p.add_argument(
        "--gate",
        action="append",
        default=[],
        help="NAME=VALUE (survival, specificity_drop, efficacy, relative_margin, perplexity_increase; "
        "'off' disables); repeatable",
    )
    add_set(p)
    p.add_argument("--method", default=None, help="default | alphaedit | encore | memit")
    p.add_argument("--layers", default=None, help="edited layers, e.g. 4-8 (default: per architecture)")
    p.add_argument("--batch-size", type=positive, default=None, help="sequential edit batches of this size")
    p.add_argument(
        "--corpus", default=None, help="text file or directory for key statistics (default: generated)"
    )
    p.add_argument("--n-tokens", type=positive, default=None, help="statistics tokens (default 30,000)")
    p.add_argument(
        "--preserved", default=None, help="extra facts that must not change (same formats as --edits)"
    )
    p.add_argument(
        "--preserved-n", type=positive, default=None, help="at most this many preserved facts (default 50)"
    )
    p.add_argument(
        "--heldout",
        default=None,
        help="text file for the perplexity probe (default: a public-domain passage shipped in the package)",
    )
    p.add_argument("--protect-edits", default=None, help="none | q8_0 | f16 (default q8_0)")
    add_no_generation(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the paired baselines")
    p.add_argument(
        "--harden",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="harden every edit batch against the targets' quantization, simulated in torch (default: on, but "
        "not with --device-map; see edit --harden-for)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (editing and fp32 scoring)")
    add_dtype(p, default=None)
    add_device_map(p)
    p.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    return cmd_run


def run_settings(args: argparse.Namespace) -> dict:
    """The run's settings: the TOML [run] table (paths relative to the TOML file), overridden by flags."""
    from ..ops.settings import run_table

    settings = run_table(args.config) if args.config else {}
    settings.update({k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k) is not None})
    if args.no_baseline:
        settings["baseline"] = False
    if args.harden is not None:
        settings["harden"] = args.harden
    if args.no_generation:
        settings["generation"] = False
    gates = settings.get("gates", [])
    if isinstance(gates, dict):
        gates = [f"{k}={'off' if v is False else v}" for k, v in gates.items()]
    elif isinstance(gates, str):
        gates = [gates]
    settings["gates"] = [*gates, *args.gate]
    missing = [k for k in ("model", "edits", "targets", "out") if not settings.get(k)]
    if missing:
        raise UsageError(
            f"missing {', '.join('--' + k for k in missing)} (give them as flags or in the [run] table)"
        )
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from ..ops.run import RunConfig, run
    from ..ops.settings import edit_config

    s = run_settings(args)
    cfg = edit_config(args.config, args.set, method=args.method, layers=args.layers)
    quiet = getattr(args, "quiet", False) or args.json
    result = run(RunConfig(cfg=cfg, quiet=quiet, **s))
    if args.json:
        print(result.reports["json"].read_text(), end="")
    else:
        print_summary(result)
    return 0 if result.passed else 1


def print_summary(result, out=None) -> None:
    from ..ops.report import build_report
    from ..report import SUMMARY_HEADERS, summary_rows

    out = out or sys.stdout

    doc = (
        json.loads(result.reports["json"].read_text()) if result.reports.get("json") else build_report(result)
    )
    print(file=out)
    print_table(SUMMARY_HEADERS, summary_rows(doc), out=out)
    print(file=out)
    for t in doc["targets"]:
        for g in t["gates"]:
            if not g["passed"]:
                print(f"[FAIL] {t['target']} {g['name']}: {g['detail']}", file=out)
                for f in g["failing"][:5]:
                    print(f"        {f}", file=out)
                if len(g["failing"]) > 5:
                    print(f"        ... and {len(g['failing']) - 5} more", file=out)
    reused = sum(t.export_cached for t in result.targets)
    edit = "reused" if result.edit_cached else f"{result.seconds.get('edit', 0):.1f} s"
    print(
        f"edit: {edit} · exports reused: {reused}/{len(result.targets)} · total "
        f"{result.seconds.get('total', 0):.1f} s",
        file=out,
    )
    for t in result.targets:
        if t.modelfile is not None:
            print(f"ollama: ollama create edited-{t.target.quant.lower()} -f {t.modelfile}", file=out)
    if result.reports:
        print(f"report: {result.reports['html']} (also report.json, report.md)", file=out)
    print("PASS: every gate passed" if result.passed else "FAIL: a gate failed (exit code 1)", file=out)


# ---------------------------------------------------------------- demo
def add_demo(sub) -> Callable:
    p = sub.add_parser(
        "demo", help=f"run on {DEMO_MODEL} with the example edits, then chat with the edited GGUF"
    )
    p.add_argument("--out", default="edit2deploy-demo", help="output directory (default: ./edit2deploy-demo)")
    p.add_argument(
        "--n-tokens",
        type=positive,
        default=DEMO_N_TOKENS,
        help=f"statistics tokens (default {DEMO_N_TOKENS:,}, model-generated text)",
    )
    p.add_argument("--no-chat", action="store_true", help="skip the chat at the end")
    return cmd_demo


def cmd_demo(args: argparse.Namespace) -> int:
    from ..ops.demo import demo_chat, demo_edits_path, demo_targets
    from ..ops.run import RunConfig, run

    targets, note = demo_targets()
    if note:
        print(f"edit2deploy: note: {note}", file=sys.stderr)
    quiet = getattr(args, "quiet", False)
    result = run(
        RunConfig(DEMO_MODEL, demo_edits_path(), targets, args.out, n_tokens=args.n_tokens, quiet=quiet)
    )
    print_summary(result)
    if not args.no_chat:
        gguf = next((t for t in result.targets if t.target.format == "gguf"), None)
        if gguf is not None:
            print()
            for line in demo_chat(gguf, result.requests):
                print(line)
    print(f"\nreport: {result.reports['html']}")
    return 0 if result.passed else 1
