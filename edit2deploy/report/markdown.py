"""report.md: the report document as Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .text import (
    GEN_HEADERS,
    GEN_TEXT_HEADERS,
    SUMMARY_HEADERS,
    _norm_series,
    _num,
    _ppl_value,
    _short_tensor,
    _signed,
    generation_tables,
    ledger_rows,
    summary_rows,
)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(doc: dict) -> str:
    lines = [
        "# edit2deploy report",
        "",
        (
            f"**{'PASS' if doc['passed'] else 'FAIL'}** — model `{doc['model']['spec']}`, "
            f"{doc['edits']['count']} edit(s) from `{doc['edits']['source']}`, {len(doc['targets'])} target(s). "
            f"Created {doc['created']} by edit2deploy {doc['tool']['version']}."
        ),
        "",
        "## Targets",
        "",
        _md_table(SUMMARY_HEADERS, summary_rows(doc)),
        "",
        (
            "Rates are success percentages. Teacher-forced (efficacy, paraphrase, neighbourhood): the new target "
            "beats the old answer after the exact prompt; neighbourhood: the old answer is kept. Generated "
            "(completion, chat): greedy text that mentions the new answer before (or without) the old one — the "
            "prompt continued, and the prompt sent as a chat message through the model's own template. Survival = "
            "share of fact verdicts in the artifact equal to the fp32 edited model's."
        ),
        "",
        *_generation_md(doc),
        "## Gates",
        "",
    ]
    for t in doc["targets"]:
        for g in t["gates"]:
            lines.append(
                f"- `{t['target']}` **{'PASS' if g['passed'] else 'FAIL'}** {g['name']}: {g['detail']}"
            )
            lines += [f"  - {f}" for f in g["failing"][:10]]
    if not any(t["gates"] for t in doc["targets"]):
        lines.append("No gates were set.")
    p = doc["perplexity"]
    lines += [
        "",
        "## Perplexity",
        "",
        f"Held-out text: `{doc['heldout']['source']}` ({doc['heldout']['pairs']} (first sentence, rest) pairs).",
        "",
        _md_table(
            ["model", "perplexity", "tokens", "Δ vs its fp32"],
            [
                ["fp32 edited", _num(_ppl_value(p["fp32"])), (p["fp32"] or {}).get("n_tokens", "-"), "-"],
                [
                    "fp32 unedited",
                    _num(_ppl_value(p["base_fp32"])),
                    (p["base_fp32"] or {}).get("n_tokens", "-"),
                    "-",
                ],
                *[
                    [
                        t["target"],
                        _num(_ppl_value(t["perplexity"]["artifact"])),
                        (t["perplexity"]["artifact"] or {}).get("n_tokens", "-"),
                        _signed(t["perplexity"]["delta_vs_fp32"]),
                    ]
                    for t in doc["targets"]
                ],
                *[
                    [
                        f"{t['target']} paired baseline",
                        _num(_ppl_value(t["perplexity"]["baseline"])),
                        (t["perplexity"]["baseline"] or {}).get("n_tokens", "-"),
                        _signed(t["perplexity"]["baseline_delta_vs_base_fp32"]),
                    ]
                    for t in doc["targets"]
                    if t["perplexity"]["baseline"] is not None
                ],
            ],
        ),
        "",
        "## Norm growth per edited layer (‖W − W0‖_F after each batch)",
        "",
    ]
    names, batch_ids, values = _norm_series(doc)
    lines.append(
        _md_table(
            ["batch", *[_short_tensor(n) for n in names]],
            [[b, *[_num(values.get((n, b)), ".3f") for n in names]] for b in batch_ids],
        )
    )
    lines += ["", "## Ledger", "", _ledger_md(doc), "", "## Facts", ""]
    for t in doc["targets"]:
        lines += [
            f"### {t['target']}",
            "",
            _md_table(
                ["kind", "id", "prompt", "expected", "margin fp32", "margin artifact", "survived"],
                [
                    [
                        f["kind"],
                        f["request_id"],
                        f["prompt"],
                        f["expected"],
                        _signed(f["margin_fp32"]),
                        _signed(f["margin_artifact"]),
                        "yes" if f["survived"] else "**no**",
                    ]
                    for f in t["facts"]
                ],
            ),
            "",
        ]
        if t["modelfile"]:
            lines += [f"Ollama: `ollama create edited -f {t['modelfile']}`", ""]
    lines += [
        "## Timings (s)",
        "",
        _md_table(list(doc["timings"]), [[_num(v, ".1f") for v in doc["timings"].values()]]),
        "",
    ]
    peaks = (doc.get("memory") or {}).get("peak_rss_mib")
    if peaks:
        lines += [
            "## Peak memory (MiB, resident)",
            "",
            _md_table(list(peaks), [[_num(v, ".0f") for v in peaks.values()]]),
            "",
        ]
    return "\n".join(lines)


def _ledger_md(doc: dict) -> str:
    led = doc["ledger"]
    rows = ledger_rows(doc)
    head = f"Base model `{led['base_model']}`; statistics corpus `{led['corpus']}`, {led['n_tokens']} tokens."
    return (
        head
        + "\n\n"
        + _md_table(["batch", "status", "time", "method", "requests", "seconds", "‖ΔW‖_F"], rows)
    )


def _generation_md(doc: dict) -> list[str]:
    """Teacher-forced and generated rates side by side, per target and place, and each fact's generated text."""
    g = generation_tables(doc)
    if g is None:
        return []
    out = ["## Generated answers", "", _md_table(GEN_HEADERS, g.rates), ""]
    out += [f"- {n}" for n in g.notes] + ([""] if g.notes else [])
    texts = [[c.replace("|", "/") for c in row] for row in g.texts]
    out += [
        "Each edited fact's generated text in the artifact (first 120 characters):",
        "",
        _md_table(GEN_TEXT_HEADERS, texts),
        "",
    ]
    return out
