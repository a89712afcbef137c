"""The `edit2deploy` command line. Usage errors: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from .errors import Edit2DeployError, InputFileError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `minimum`, else a usage error saying `expected`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_count = _int_at_least(0, "an integer ≥ 0")
_positive = _int_at_least(1, "a positive integer")


def _json_safe(obj):
    """JSON has no Infinity/NaN: write them as null."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt_p(lp: float | None) -> str:
    import math

    return "-" if lp is None else f"{math.exp(lp):.3f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


# ---------------------------------------------------------------- facts
def _add_facts(sub) -> Callable:
    p = sub.add_parser("facts", help="score facts on a model: p(target) vs p(true), top-1 token")
    p.add_argument("--model", required=True, help="HF directory, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument(
        "--facts", required=True, help="edit/fact file: .jsonl (ours) or CounterFact/EasyEdit .json"
    )
    p.add_argument("--limit", type=_positive, default=None, help="only the first N records")
    p.add_argument(
        "--probes",
        default="edit",
        help="which prompts to score: comma list of edit,paraphrase,neighborhood (default: edit)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return cmd_facts


def cmd_facts(args: argparse.Namespace) -> int:
    from .checks import PROBE_KINDS, probes_for, rates, run_probes
    from .models import open_model
    from .requests import load_requests
    from .scoring import TorchScorer

    kinds = [k.strip() for k in args.probes.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PROBE_KINDS]
    if not kinds:
        raise UsageError(f"--probes: empty list (expected a comma list of {', '.join(PROBE_KINDS)})")
    if bad:
        raise UsageError(
            f"--probes: unknown kind '{','.join(bad)}' (expected a comma list of {', '.join(PROBE_KINDS)})"
        )
    requests = load_requests(args.facts, limit=args.limit)
    lm = open_model(args.model, device=args.device)
    results = run_probes(
        TorchScorer(lm.model, lm.tokenizer), probes_for(requests, kinds), decode=lm.tokenizer.decode
    )
    summary = rates(results)
    if args.json:
        doc = {"model": args.model, "facts": [r.to_json() for r in results], "rates": summary}
        json.dump(_json_safe(doc), sys.stdout, indent=1, allow_nan=False)
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
                _fmt_p(r.lp_expected),
                pr.other or "-",
                _fmt_p(r.lp_other),
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


# ---------------------------------------------------------------- edit
def _add_edit(sub) -> Callable:
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
        "--batch-size", type=int, default=None, help="sequential batches of this size (default: all at once)"
    )
    p.add_argument(
        "--corpus", default=None, help="text file or directory for key statistics (default: model-generated)"
    )
    p.add_argument("--n-tokens", type=int, default=None, help="tokens of statistics corpus (default 100,000)")
    p.add_argument("--config", default=None, help="TOML file with an [edit] table of hyperparameters")
    p.add_argument(
        "--preserved",
        default=None,
        help="facts that must not change (same formats as --edits): their keys leave the null space "
        "(alphaedit/default; with a model's first edits)",
    )
    p.add_argument("--preserved-n", type=_positive, default=None, help="only the first N preserved facts")
    p.add_argument(
        "--retry-rounds",
        type=_count,
        default=None,
        help="re-solve each batch up to N more times for edits that did not take (default 0)",
    )
    p.add_argument("--limit", type=_positive, default=None, help="only the first N requests")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    h = p.add_argument_group("quantization-aware hardening")
    h.add_argument(
        "--harden-for",
        default=None,
        help="targets the edits must survive, e.g. Q4_K_M,onnx:int4,bnb:nf4 (FORMAT:TYPE:none for "
        "unprotected export); facts predicted to flip are re-optimised and the batch re-solved",
    )
    h.add_argument(
        "--harden-protect-edits", default="q8_0", help="protection the targets will be exported with"
    )
    h.add_argument(
        "--harden-margin", type=float, default=None, help="nats/token the target must win by (default 1.0)"
    )
    h.add_argument("--harden-rounds", type=int, default=None, help="re-solve rounds per batch (default 3)")
    h.add_argument(
        "--harden-risk",
        type=float,
        default=None,
        help="also harden facts predicted to win by less than this many nats/token (default 0.5)",
    )
    h.add_argument(
        "--harden-specificity",
        type=float,
        default=None,
        help="most neighbourhood points a round may cost before it is undone (default 5)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    return cmd_edit


def _hardening(args: argparse.Namespace):
    """(scheme factories, HardenConfig) from the --harden-* flags (empty when not asked for)."""
    from .methods.harden import HardenConfig

    if not args.harden_for:
        if any(
            v is not None
            for v in (args.harden_margin, args.harden_rounds, args.harden_specificity, args.harden_risk)
        ):
            raise UsageError(
                "--harden-margin/--harden-rounds/--harden-specificity/--harden-risk need --harden-for"
            )
        return (), None
    from .cli_predict import build_scheme, parse_schemes

    specs = parse_schemes(args.harden_for, args.harden_protect_edits.lower())
    base = HardenConfig()
    cfg = HardenConfig(
        margin=base.margin if args.harden_margin is None else args.harden_margin,
        rounds=base.rounds if args.harden_rounds is None else args.harden_rounds,
        specificity_limit=base.specificity_limit
        if args.harden_specificity is None
        else args.harden_specificity,
        risk=base.risk if args.harden_risk is None else args.harden_risk,
    )
    if cfg.margin <= 0 or cfg.rounds < 1:
        raise UsageError("--harden-margin must be > 0 and --harden-rounds ≥ 1")

    def factory(spec):
        return lambda lm, edited: build_scheme(spec, lm.model_dir, edited_tensors=edited)

    return [factory(s) for s in specs], cfg


def _edit_config(args: argparse.Namespace):
    from .config import edit_config_from, load_toml, parse_layers
    from .methods import EditConfig

    cfg = EditConfig()
    if args.config:
        data = load_toml(args.config)
        unknown = set(data) - {"edit", "run"}
        if unknown:
            raise UsageError(f"{args.config}: unknown table(s) {sorted(unknown)} (expected [edit])")
        cfg = edit_config_from(data.get("edit", {}), args.config, cfg)
    overrides = {}
    if args.method:
        overrides["method"] = args.method
    if args.layers:
        overrides["layers"] = ",".join(map(str, parse_layers(args.layers)))
    if getattr(args, "retry_rounds", None) is not None:
        overrides["retry_rounds"] = args.retry_rounds
    return edit_config_from(overrides, "command line", cfg) if overrides else cfg


def cmd_edit(args: argparse.Namespace) -> int:
    from .editing import edit_model
    from .requests import load_requests

    if args.preserved_n is not None and not args.preserved:
        raise UsageError("--preserved-n needs --preserved")
    schemes, harden = _hardening(args)
    run = edit_model(
        args.model,
        args.edits,
        args.out,
        cfg=_edit_config(args),
        batch_size=args.batch_size,
        corpus=args.corpus,
        n_tokens=args.n_tokens,
        device=args.device,
        force=args.force,
        limit=args.limit,
        quiet=getattr(args, "quiet", False),
        harden_for=schemes,
        harden=harden,
        preserved=load_requests(args.preserved, limit=args.preserved_n) if args.preserved else (),
    )
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
            print(
                f"\n{n} edits in {run.seconds:.1f} s ({run.seconds / n:.2f} s/edit; statistics {run.stats_seconds:.1f} s)"
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


# ---------------------------------------------------------------- stats
def _add_stats(sub) -> Callable:
    p = sub.add_parser("stats", help="precompute key statistics (C = E[k kᵀ]) for the edited layers")
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", default=None, help="text file or directory (default: model-generated text)")
    p.add_argument("--n-tokens", type=int, default=None, help="default 100,000")
    p.add_argument("--layers", default=None, help="default: the architecture's edited layers")
    p.add_argument("--device", default="cpu")
    return cmd_stats


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    from .config import parse_layers
    from .models import open_model, weights_fingerprint
    from .stats import DEFAULT_N_TOKENS, corpus_from_path, key_stats

    lm = open_model(args.model, device=args.device)
    layers = parse_layers(args.layers) if args.layers else lm.arch.layers_for(lm.num_layers)
    corpus = corpus_from_path(args.corpus)
    t = time.perf_counter()
    stats = key_stats(
        lm,
        layers,
        weights_fingerprint(lm.model_dir),
        corpus,
        args.n_tokens or DEFAULT_N_TOKENS,
        quiet=getattr(args, "quiet", False),
    )
    print_table(["layer", "d_in", "tokens"], [[li, s.C.shape[0], s.n_tokens] for li, s in stats.items()])
    print(
        f"\nstatistics for layers {list(layers)} ready in {time.perf_counter() - t:.1f} s (corpus {corpus.id})"
    )
    return 0


# ---------------------------------------------------------------- rollback / log
def _add_rollback(sub) -> Callable:
    p = sub.add_parser("rollback", help="undo edit batches exactly (bit for bit)")
    p.add_argument("--model", required=True, help="an edited model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--last", type=int, help="undo the last N batches")
    g.add_argument("--batch", help="undo one named batch (see `edit2deploy log`)")
    p.add_argument("--out", default=None, help="write the result here instead of in place")
    return cmd_rollback


def cmd_rollback(args: argparse.Namespace) -> int:
    from .ledger import rollback

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


def _add_log(sub) -> Callable:
    p = sub.add_parser("log", help="list the edit ledger of an edited model")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    return cmd_log


def cmd_log(args: argparse.Namespace) -> int:
    from .ledger import Ledger

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


def _deploy_commands() -> tuple[Callable, ...]:
    from .cli_deploy import add_export, add_verify

    return (add_export, add_verify)


def _run_commands() -> tuple[Callable, ...]:
    from .cli_run import add_demo, add_run

    return (add_run, add_demo)


def _predict_commands() -> tuple[Callable, ...]:
    from .cli_predict import add_predict

    return (add_predict,)


COMMANDS: tuple[Callable, ...] = (
    _add_facts,
    _add_edit,
    _add_stats,
    _add_rollback,
    _add_log,
    *_deploy_commands(),
    *_predict_commands(),
    *_run_commands(),
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="edit2deploy",
        description="Edit facts in a local LLM, export it (GGUF/ONNX), and verify the edits in the real runtime.",
    )
    parser.add_argument("--version", action="version", version=f"edit2deploy {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for internal errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _orig_add = sub.add_parser
    sub.add_parser = lambda *a, **k: _orig_add(
        *a, parents=[common], **k
    )  # every command takes --quiet/--debug
    handlers = {}
    for add in COMMANDS:
        handler = add(sub)
        handlers[handler.__name__.removeprefix("cmd_")] = handler
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "quiet", False):
            os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return int(args._handlers[args.command.replace("-", "_")](args) or 0)
    except InputFileError as exc:
        print(f"edit2deploy: error: {len(exc.problems)} problem(s) in input:", file=sys.stderr)
        print(exc.report(), file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"edit2deploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edit2deploy: interrupted", file=sys.stderr)
        return 130
    except Edit2DeployError as exc:
        print(f"edit2deploy: failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # internal failure: say what to report
        if debug:
            raise
        print(
            f"edit2deploy: internal error: {type(exc).__name__}: {exc}\n"
            "Please report this with the command you ran; rerun with --debug for the traceback.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
