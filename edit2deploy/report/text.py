"""Number formatting and tables shared by the Markdown and HTML reports and the CLI summary."""

from __future__ import annotations

import html
from dataclasses import dataclass
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
    "completion",  # generated: the new answer in the prompt's greedy continuation
    "chat",  # generated: the new answer in the chat reply to the prompt
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
        gen = (t.get("generation") or {}).get("rates", {}).get("artifact", {})
        rows.append(
            [
                t["target"],
                _size(t["artifact"]["size_bytes"]),
                "reused" if t["artifact"]["reused"] else f"{t['artifact']['seconds']:.1f} s",
                f"{_pct(a.get('edit'))} (fp32 {_pct(f.get('edit'))})",
                _pct(a.get("paraphrase")),
                _pct(a.get("neighborhood")),
                _pct(gen.get("completion_new")),
                _pct(gen.get("chat_prompt_new")),
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


GEN_RATES = (
    "completion_new",
    "chat_prompt_new",
    "chat_new",
    "chat_old",
    "neighborhood_kept",
    "neighborhood_chat_kept",
)
GEN_HEADERS = (
    "target",
    "place",
    "efficacy (TF)",
    "paraphrase (TF)",
    "completion new",
    "chat (prompt) new",
    "chat new",
    "chat old",
    "neighbourhood kept",
    "neighbourhood (chat) kept",
)
GEN_TEXT_HEADERS = ("target", "id", "kind", "asked", "new answer", "fp32", "artifact", "artifact's text")


@dataclass
class GenerationTables:
    rates: list[list[str]]  # GEN_HEADERS rows: teacher-forced (TF) and generated rates side by side
    texts: list[list[str]]  # GEN_TEXT_HEADERS rows: each edited fact's generated text in the artifact
    notes: list[str]


def generation_tables(doc: dict) -> GenerationTables | None:
    """The generated-answers tables of a report (None when no target generated text)."""
    rates, texts, notes = [], [], []
    for t in doc["targets"]:
        gen = t.get("generation")
        if not gen:
            continue
        for place, r in gen["rates"].items():
            tf = t["rates"].get(place, {})
            rates.append(
                [t["target"], place, _pct(tf.get("edit")), _pct(tf.get("paraphrase"))]
                + [_pct(r.get(k)) for k in GEN_RATES]
            )
        notes += [f"{t['target']}: {n}" for n in gen["notes"]]
        agree = gen.get("neighborhood_chat_agreement")
        if agree is not None:
            notes.append(f"{t['target']}: neighbourhood questions asked in chat: the artifact's reply keeps or loses the "
                         f"answer as the paired baseline's does for {agree:.1f}%")  # fmt: skip
        for f in gen["facts"]:
            if not f["kind"].startswith("neighborhood"):
                verdicts = [f["verdict_fp32"] or "-", f["verdict_artifact"] or "-"]
                asked = [t["target"], f["request_id"], f["kind"], f["text"][:60], f["expected"]]
                texts.append(asked + verdicts + [" ".join((f["text_artifact"] or "").split())])
    return GenerationTables(rates, texts, notes) if rates else None


def ledger_rows(doc: dict) -> list[list[str]]:
    """One row per ledger batch: id, status, time, method, requests, seconds, ‖ΔW‖_F per edited tensor."""
    led = doc["ledger"]
    return [
        [
            b["id"],
            "active" if b["id"] in led["active_batches"] else "rolled back",
            b["time"],
            b["method"],
            ", ".join(str(r) for r in b["requests"]),
            _num(b["seconds"], ".1f"),
            " ".join(f"{_short_tensor(n)}={_num(t['delta_fro'], '.3f')}" for n, t in b["tensors"].items()),
        ]
        for b in led["batches"]
    ]
