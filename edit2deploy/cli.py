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


def _fmt_p(lp: float | None) -> str:
    import math

    return "-" if lp is None else f"{math.exp(lp):.3f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=sys.stdout) -> None:
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
    p.add_argument("--facts", required=True, help="edit/fact file: .jsonl (ours) or CounterFact/EasyEdit .json")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
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
    if bad or not kinds:
        raise UsageError(f"--probes: unknown kind '{','.join(bad)}' (expected a comma list of {', '.join(PROBE_KINDS)})")
    requests = load_requests(args.facts, limit=args.limit)
    lm = open_model(args.model, device=args.device)
    results = run_probes(TorchScorer(lm.model, lm.tokenizer), probes_for(requests, kinds), decode=lm.tokenizer.decode)
    summary = rates(results)
    if args.json:
        json.dump({"model": args.model, "facts": [r.to_json() for r in results], "rates": summary}, sys.stdout, indent=1)
        print()
        return 0
    rows = []
    for r in results:
        pr = r.probe
        wins = "expected" if r.success else "other"
        if pr.kind == "neighborhood":
            wins = "true" if r.success else "new"
        else:
            wins = "target" if r.success else ("true" if pr.other is not None else "-")
        rows.append([pr.request_id, pr.kind, pr.prompt, pr.expected, _fmt_p(r.lp_expected), pr.other or "-",
                     _fmt_p(r.lp_other), wins, repr(r.top1)])
    print_table(["id", "kind", "prompt", "target", "p(target)", "other", "p(other)", "wins", "top-1"], rows)
    print()
    print("  ".join(f"{k}: {v:.1f}%" for k, v in summary.items() if v is not None)
          + "   (p = per-token geometric mean for multi-token answers)")
    return 0


COMMANDS: tuple[Callable, ...] = (_add_facts,)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="edit2deploy",
        description="Edit facts in a local LLM, export it (GGUF/ONNX), and verify the edits in the real runtime.",
    )
    parser.add_argument("--version", action="version", version=f"edit2deploy {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    handlers = {}
    for add in COMMANDS:
        handler = add(sub)
        handlers[handler.__name__.removeprefix("cmd_")] = handler
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.quiet:
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
