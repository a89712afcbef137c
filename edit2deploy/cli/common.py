"""What every command shares: the argument parser that turns mistakes into usage errors, argument types, the
`--set` option, and table printing."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from ..errors import UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message} (see --help)")


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
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


count = int_at_least(0, "an integer ≥ 0")
positive = int_at_least(1, "a positive integer")


def finite_at_least(minimum: float, expected: str) -> Callable[[str], float]:
    """An argparse type: a finite number ≥ `minimum` (argparse's `float` would take "nan" and "inf")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'")
        return value

    return parse


non_negative = finite_at_least(0.0, "a finite number ≥ 0")


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an [edit] hyperparameter (e.g. --set lr=0.25 --set mpes=false); repeatable; see docs/method.md",
    )


def add_dtype(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument(
        "--dtype",
        default=default,
        help="auto | bfloat16 | float16 | float32: precision the model's weights are loaded in (default auto: the "
        "checkpoint's own); the edited "
        "projections, statistics and solves stay float32/float64",
    )


def add_device_map(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device-map",
        default=None,
        metavar="auto",
        help="auto: place a model past one device across the GPUs, the CPU and (past them) disk with accelerate's "
        "big-model inference, the edited layers held in memory (instead of --device)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="DEVICE=SIZE,...",
        help="with --device-map auto: memory each device may hold, e.g. 0=20GiB,cpu=60GiB (default: what each has "
        "free)",
    )


def add_no_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-generation",
        action="store_true",
        help="do not judge generated text (completions and chat replies); teacher-forced checks only",
    )


def json_safe(obj):
    """JSON has no Infinity/NaN: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
