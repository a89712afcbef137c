"""Number formatting and tables shared by the Markdown and HTML reports and the CLI summary."""

from __future__ import annotations

import html
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _frac(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _signed(x: float | None, fmt: str = "+.2f") -> str:
    return "-" if x is None else format(x, fmt)


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def _ppl_value(p: dict | None) -> float | None:
    return None if p is None else p.get("value")


SUMMARY_HEADERS = (
    "target",
    "size",
    "export",
    "efficacy",
    "paraphrase",
    "neighbourhood",
    "survival",
    "edited surv.",
    "ppl",
    "Δppl",
    "gates",
)


def summary_rows(doc: dict) -> list[list[str]]:
    """One row per target (terminal table, Markdown and HTML share it)."""
    rows = []
    for t in doc["targets"]:
        a = t["rates"].get("artifact", {})
        f = t["rates"].get("fp32", {})
        failed = [g["name"] for g in t["gates"] if not g["passed"]]
        rows.append(
            [
                t["target"],
                _size(t["artifact"]["size_bytes"]),
                "reused" if t["artifact"]["reused"] else f"{t['artifact']['seconds']:.1f} s",
                f"{_pct(a.get('edit'))} (fp32 {_pct(f.get('edit'))})",
                _pct(a.get("paraphrase")),
                _pct(a.get("neighborhood")),
                _frac(t["survival"].get("all")),
                _frac(t["survival"].get("edited")),
                _num(_ppl_value(t["perplexity"]["artifact"])),
                _signed(t["perplexity"]["delta_vs_fp32"]),
                "PASS" if not failed else "FAIL: " + ", ".join(failed),
            ]
        )
    return rows


def _norm_series(doc: dict) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(tensor names in layer order, batch ids, {(tensor, batch): ‖W−W0‖_F after that batch})."""
    batches = doc["ledger"]["batches"]
    layer_of: dict[str, int] = {}
    values: dict[tuple[str, str], float] = {}
    for b in batches:
        for name, t in b["tensors"].items():
            layer_of[name] = t.get("layer") if t.get("layer") is not None else 0
            if t.get("fro_from_original") is not None:
                values[(name, b["id"])] = t["fro_from_original"]
    names = sorted(layer_of, key=lambda n: (layer_of[n], n))
    return names, [b["id"] for b in batches], values


def _short_tensor(name: str) -> str:
    import re

    m = re.search(r"\.(\d+)\.", name)
    return f"L{m.group(1)}" if m else name


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)
