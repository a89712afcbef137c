"""CLI commands `run` (edits → verified artifacts in one command) and `demo`."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError

RUN_KEYS = {
    "model",
    "edits",
    "targets",
    "out",
    "gates",
    "batch_size",
    "corpus",
    "n_tokens",
    "preserved",
    "preserved_n",
    "heldout",
    "protect_edits",
    "baseline",
    "device",
    "harden",
}
PATH_KEYS = ("edits", "out", "corpus", "preserved", "heldout")
DEMO_MODEL = "smollm2-135m"
DEMO_N_TOKENS = 20_000


# ---------------------------------------------------------------- run
def add_run(sub) -> Callable:
    p = sub.add_parser(
        "run",
        help="edit → export every target → verify each in its runtime → report.{json,md,html} (one command)",
    )
    p.add_argument("--model", default=None, help="HF directory, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("--edits", default=None, help="edit file: .jsonl (ours) or CounterFact/EasyEdit .json")
    p.add_argument(
        "--targets", default=None, help="comma list of FORMAT:TYPE, e.g. gguf:Q4_K_M,gguf:Q8_0,onnx:int4"
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
    p.add_argument("--method", default=None, help="default | alphaedit | encore | memit")
    p.add_argument("--layers", default=None, help="edited layers, e.g. 4-8 (default: per architecture)")
    p.add_argument("--batch-size", type=int, default=None, help="sequential edit batches of this size")
    p.add_argument(
        "--corpus", default=None, help="text file or directory for key statistics (default: generated)"
    )
    p.add_argument("--n-tokens", type=int, default=None, help="statistics tokens (default 100,000)")
    p.add_argument(
        "--preserved", default=None, help="extra facts that must not change (same formats as --edits)"
    )
    p.add_argument(
        "--preserved-n", type=int, default=None, help="at most this many preserved facts (default 50)"
    )
    p.add_argument(
        "--heldout",
        default=None,
        help="text file for the perplexity probe (default: a public-domain passage shipped in the package)",
    )
    p.add_argument("--protect-edits", default=None, help="none | q8_0 | f16 (default q8_0)")
    p.add_argument("--no-baseline", action="store_true", help="skip the paired baselines")
    p.add_argument(
        "--harden",
        action="store_true",
        default=None,
        help="harden every edit batch against the targets' quantization (simulated in torch; see edit --harden-for)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (editing and fp32 scoring)")
    p.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    return cmd_run


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return value if p.is_absolute() else str(base / p)


def run_settings(args: argparse.Namespace) -> dict:
    """The run's settings: the TOML [run] table (paths relative to the TOML file), overridden by flags."""
    from .config import load_toml

    settings: dict = {}
    if args.config:
        data = load_toml(args.config)
        unknown_tables = set(data) - {"edit", "run"}
        if unknown_tables:
            raise UsageError(
                f"{args.config}: unknown table(s) {sorted(unknown_tables)} (expected [run] and [edit])"
            )
        table = data.get("run", {})
        if not isinstance(table, dict):
            raise UsageError(f"{args.config}: [run] must be a table")
        bad = sorted(set(table) - RUN_KEYS)
        if bad:
            raise UsageError(
                f"{args.config}: [run]: unknown field(s) {bad} (expected one of: {', '.join(sorted(RUN_KEYS))})"
            )
        base = Path(args.config).resolve().parent
        for key, value in table.items():
            if key in PATH_KEYS and isinstance(value, str):
                value = _resolve(value, base)
            if key == "model" and isinstance(value, str) and (base / value).exists():
                value = str(base / value)
            settings[key] = value
    flags = {
        "model": args.model,
        "edits": args.edits,
        "targets": args.targets,
        "out": args.out,
        "batch_size": args.batch_size,
        "corpus": args.corpus,
        "n_tokens": args.n_tokens,
        "preserved": args.preserved,
        "preserved_n": args.preserved_n,
        "heldout": args.heldout,
        "protect_edits": args.protect_edits,
        "device": args.device,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.no_baseline:
        settings["baseline"] = False
    if getattr(args, "harden", None):
        settings["harden"] = True
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
    from .cli import _edit_config
    from .pipeline import run

    s = run_settings(args)
    quiet = getattr(args, "quiet", False)
    result = run(
        s["model"],
        s["edits"],
        s["targets"],
        s["out"],
        cfg=_edit_config(args),
        gates=s["gates"],
        batch_size=s.get("batch_size"),
        corpus=s.get("corpus"),
        n_tokens=s.get("n_tokens"),
        preserved=s.get("preserved"),
        preserved_n=s.get("preserved_n") or 50,
        heldout=s.get("heldout"),
        protect_edits=s.get("protect_edits") or "q8_0",
        baseline=s.get("baseline", True),
        device=s.get("device") or "cpu",
        quiet=quiet or args.json,
        harden=bool(s.get("harden", False)),
    )
    if args.json:
        print(result.reports["json"].read_text(), end="")
    else:
        print_summary(result)
    return 0 if result.passed else 1


def print_summary(result, out=None) -> None:
    from .cli import print_table
    from .report import SUMMARY_HEADERS, build_report, summary_rows

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
        type=int,
        default=DEMO_N_TOKENS,
        help=f"statistics tokens (default {DEMO_N_TOKENS:,}, model-generated text)",
    )
    p.add_argument("--no-chat", action="store_true", help="skip the chat at the end")
    return cmd_demo


def demo_edits_path() -> Path:
    return Path(str(importlib.resources.files("edit2deploy").joinpath("data/demo_edits.jsonl")))


def demo_targets() -> tuple[list[str], str | None]:
    import importlib.util

    from edit2deploy.exporters import FORMATS

    targets = ["gguf:Q4_K_M"]
    if "onnx" not in FORMATS:
        return targets, "the onnx format is not available in this version: exporting gguf only"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return (
            targets,
            "onnxruntime-genai is not installed (pip install 'edit2deploy[onnx]'): exporting gguf only",
        )
    return [*targets, "onnx:int8"], None


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import run

    targets, note = demo_targets()
    if note:
        print(f"edit2deploy: note: {note}", file=sys.stderr)
    quiet = getattr(args, "quiet", False)
    result = run(DEMO_MODEL, demo_edits_path(), targets, args.out, n_tokens=args.n_tokens, quiet=quiet)
    print_summary(result)
    if not args.no_chat:
        gguf = next((t for t in result.targets if t.target.format == "gguf"), None)
        if gguf is not None:
            print()
            for line in demo_chat(gguf, result.requests):
                print(line)
    print(f"\nreport: {result.reports['html']}")
    return 0 if result.passed else 1


def demo_chat(target, requests, max_tokens: int = 24) -> list[str]:
    """A short chat in llama.cpp (the GGUF's own chat template, greedy) with the edited GGUF and its unedited paired
    baseline: the user sends an edited fact's prompt. Shows the first fact whose new answer carries over into the
    chat, and says how many do (every fact is scored in the report either way)."""
    from edit2deploy.exporters import FORMATS

    exporter = FORMATS["gguf"]
    edited = exporter.scorer(target.artifact)
    try:
        replies = [
            (r, edited.chat([{"role": "user", "content": r.text}], max_tokens=max_tokens)) for r in requests
        ]
    finally:
        edited.close()
    shown = [(r, a) for r, a in replies if r.target_new.lower() in a.lower()]
    request, reply = (shown or replies)[0]
    lines = [
        f"chat in llama.cpp with {target.artifact.path.name} (greedy, the model's chat template):",
        f"  user: {request.text}",
        f"  assistant (edited): {_one_line(reply)}",
    ]
    if target.baseline is not None:
        base = exporter.scorer(target.baseline)
        try:
            before = base.chat([{"role": "user", "content": request.text}], max_tokens=max_tokens)
        finally:
            base.close()
        lines.append(f"  assistant (unedited, same {target.target.quant} export): {_one_line(before)}")
    lines.append(
        f"({len(shown)} of {len(requests)} edited facts show their new answer in this free-form chat; "
        "the report scores all of them)"
    )
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())
