"""The `edit2deploy` command line: each command parses its flags, calls one operation (`edit2deploy.ops`) and
prints. Usage errors: one line on stderr, exit code 2. Output: results on stdout, one progress bar per stage on
stderr; third-party logs only with `--verbose`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from ..errors import Edit2DeployError, InputFileError, UsageError
from .common import Parser, print_table
from .deploy import add_export, add_verify
from .edit import add_edit, add_stats
from .facts import add_facts
from .ledger import add_log, add_rollback
from .predict import add_predict
from .run import add_demo, add_run

COMMANDS: tuple[Callable, ...] = (
    add_facts,
    add_edit,
    add_stats,
    add_rollback,
    add_log,
    add_export,
    add_verify,
    add_predict,
    add_run,
    add_demo,
)

# commands that share their work across processes when launched by torchrun (`edit2deploy.distributed`)
DISTRIBUTED_COMMANDS = ("stats", "edit")

# loggers of the libraries we drive, which talk at INFO (or print) unless told not to
NOISY_LOGGERS = (
    "transformers",
    "onnxruntime",
    "onnxscript",
    "onnx_ir",
    "torch",
    "accelerate",
    "bitsandbytes",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="edit2deploy",
        description="Edit facts in a local LLM, export it (GGUF/ONNX/bitsandbytes), and verify the edits in the real runtime.",
    )
    parser.add_argument("--version", action="version", version=f"edit2deploy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    for p, default in ((parser, False), (common, argparse.SUPPRESS)):  # before or after the command
        p.add_argument("--quiet", action="store_true", default=default, help="no progress bars")
        p.add_argument("--verbose", action="store_true", default=default, help="show third-party logs")
        p.add_argument(
            "--debug", action="store_true", default=default, help="show tracebacks for internal errors"
        )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(
        *a, parents=[common], **k
    )  # every command takes the common flags
    handlers = {}
    for add in COMMANDS:
        handler = add(sub)
        handlers[handler.__name__.removeprefix("cmd_")] = handler
    parser.set_defaults(_handlers=handlers)
    return parser


def configure_output(quiet: bool, verbose: bool) -> None:
    """Quiet by default: warnings and third-party INFO logs are hidden unless `verbose`; `quiet` drops the bars."""
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-file bars would come on top of ours
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        hf_logging.set_verbosity_info()
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # ours are for the user (a corrupt cache recomputed, duplicate edits merged): one line each
    warnings.filterwarnings("default", module=r"edit2deploy(\.|$)")
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"edit2deploy: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub at run time
    parser = build_parser()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        configure_output(getattr(args, "quiet", False), getattr(args, "verbose", False))
        if args.command not in DISTRIBUTED_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # N copies would each do the whole job and race on the same outputs
            raise UsageError(
                f"only `stats` and `edit` run across processes (torchrun); run `{args.command}` as one process"
            )
        return int(args._handlers[args.command.replace("-", "_")](args) or 0)
    except InputFileError as exc:
        if len(exc.problems) == 1:  # one problem, one line
            print(f"edit2deploy: error: {exc.problems[0]}", file=sys.stderr)
        else:
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


__all__ = ["COMMANDS", "build_parser", "main", "print_table"]
