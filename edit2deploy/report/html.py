"""report.html: the report document as one self-contained page (inline CSS and SVG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..probes import EDITED_KINDS
from .svg import EDITED_COLOUR, PRESERVED_COLOUR, bars_svg, hbars_svg, scatter_svg
from .text import (
    GEN_HEADERS,
    GEN_TEXT_HEADERS,
    SUMMARY_HEADERS,
    _e,
    _norm_series,
    _num,
    _ppl_value,
    _short_tensor,
    _signed,
    generation_tables,
    ledger_rows,
    summary_rows,
)

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px 32px;color:#1b1f24;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}p.meta{color:#57606a;margin:0 0 12px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:600;color:#fff}
.pass{background:#1a7f37}.fail{background:#cf222e}
td.ok{color:#1a7f37;font-weight:600}td.bad{color:#cf222e;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:18px}figure{margin:0}figcaption{font-size:12px;color:#57606a;max-width:420px}
svg text{font-family:inherit;font-size:11px;fill:#1b1f24}code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def _html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    classes: Sequence[Sequence[str]] | None = None,
    raw: bool = False,
) -> str:
    out = ["<table><thead><tr>", *[f"<th>{_e(h)}</th>" for h in headers], "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        out.append("<tr>")
        for j, c in enumerate(r):
            cls = classes[i][j] if classes else ""
            out.append(
                f"<td class='{cls}'>{c if raw else _e(c)}</td>" if cls else f"<td>{c if raw else _e(c)}</td>"
            )
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _scatter_points(t: dict) -> list[tuple[float, float, str, str]]:
    pts = []
    for f in t["facts"]:
        x, y = f.get("margin_fp32"), f.get("margin_artifact")
        if x is None or y is None:
            continue
        series = "edited" if f["kind"] in EDITED_KINDS else "preserved"
        pts.append((x, y, series, f"{f['kind']}:{f['request_id']}: {f['prompt']} → {f['expected']}"))
    return pts


def render_html(doc: dict) -> str:
    ok = doc["passed"]
    rows = summary_rows(doc)
    classes = [[""] * (len(SUMMARY_HEADERS) - 1) + ["ok" if r[-1] == "PASS" else "bad"] for r in rows]
    body = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>edit2deploy report — {_e(doc['model']['spec'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>edit2deploy report <span class='badge {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span></h1>",
        (
            f"<p class='meta'>model <code>{_e(doc['model']['spec'])}</code> · {doc['edits']['count']} edit(s) from "
            f"<code>{_e(doc['edits']['source'])}</code> · method <code>{_e(doc['edit']['method'])}</code> · "
            f"edited tensors protected at ≥ <code>{_e(doc['edit']['protect_edits'])}</code> · "
            f"created {_e(doc['created'])} · edit2deploy {_e(doc['tool']['version'])}</p>"
        ),
        "<h2 id='targets'>Survival per target</h2>",
        _html_table(SUMMARY_HEADERS, rows, classes),
        (
            "<p class='meta'>Rates in %: edit/paraphrase = the new target beats the old answer; neighbourhood = the old "
            "answer is kept. Survival = share of fact verdicts in the artifact equal to the fp32 edited model's. "
            "Δppl = artifact perplexity − fp32 edited perplexity. Completion / chat: generated text (greedy) that "
            "gives the new answer: the prompt continued, and the prompt as a chat message through the model's "
            "own template.</p>"
        ),
        *_generation_html(doc),
        "<h2 id='margins'>Margins: fp32 vs deployed</h2>",
        (
            f"<p class='meta'>Each point is one fact: margin = log p(expected) − log p(other), mean per token. "
            f"<svg width='12' height='12'><circle cx='6' cy='6' r='5' fill='{EDITED_COLOUR}'/></svg> edited facts "
            f"(prompt and paraphrases) · <svg width='12' height='12'><circle cx='6' cy='6' r='5' "
            f"fill='{PRESERVED_COLOUR}'/></svg> preserved facts (neighbourhood). Points in the shaded quadrants changed "
            "their verdict in the artifact.</p><div class='plots'>"
        ),
    ]
    for t in doc["targets"]:
        body.append(f"<figure>{scatter_svg(_scatter_points(t), t['target'])}</figure>")
    body.append("</div>")

    names, batch_ids, values = _norm_series(doc)
    groups = [_short_tensor(n) for n in names]
    gvalues = {(_short_tensor(n), b): v for (n, b), v in values.items()}
    body += [
        "<h2 id='norms'>Norm growth per edited layer</h2>",
        "<div class='plots'><figure>",
        bars_svg(groups, batch_ids, gvalues, "‖W − W0‖_F after each batch", "edited layer"),
        (
            "<figcaption>Frobenius distance of each edited weight from the original after every batch (from the "
            "ledger). Fast growth over sequential batches is the sign of model collapse.</figcaption></figure></div>"
        ),
    ]

    p = doc["perplexity"]
    items = [
        ("fp32 edited", _ppl_value(p["fp32"]), "#6e7781"),
        ("fp32 unedited", _ppl_value(p["base_fp32"]), "#afb8c1"),
    ]
    for t in doc["targets"]:
        items.append((t["target"], _ppl_value(t["perplexity"]["artifact"]), "#0969da"))
        if t["perplexity"]["baseline"] is not None:
            items.append((f"{t['target']} baseline", _ppl_value(t["perplexity"]["baseline"]), "#54aeff"))
    ppl_rows = [[label, _num(v)] for label, v, _ in items]
    deltas = [
        [
            t["target"],
            _signed(t["perplexity"]["delta_vs_fp32"]),
            _signed(t["perplexity"]["baseline_delta_vs_base_fp32"]),
        ]
        for t in doc["targets"]
    ]
    body += [
        "<h2 id='perplexity'>Perplexity on held-out text</h2>",
        (
            f"<p class='meta'>Held-out text: <code>{_e(doc['heldout']['source'])}</code>, "
            f"{doc['heldout']['pairs']} (first sentence → rest) pairs, scored in each runtime.</p>"
        ),
        "<div class='plots'><figure>",
        hbars_svg(items, "perplexity (lower is better)"),
        "</figure><div>",
        _html_table(["model", "perplexity"], ppl_rows),
        _html_table(["target", "Δ vs fp32 edited", "baseline Δ vs fp32 unedited"], deltas),
        "</div></div>",
    ]

    body.append("<h2 id='gates'>Gates</h2>")
    grows, gcls = [], []
    for t in doc["targets"]:
        for g in t["gates"]:
            grows.append(
                [
                    t["target"],
                    g["name"],
                    "PASS" if g["passed"] else "FAIL",
                    g["detail"],
                    "; ".join(g["failing"][:5]) + (" …" if len(g["failing"]) > 5 else ""),
                ]
            )
            gcls.append(["", "", "ok" if g["passed"] else "bad", "", ""])
    body.append(
        _html_table(["target", "gate", "result", "detail", "failing facts"], grows, gcls)
        if grows
        else "<p>No gates were set.</p>"
    )

    led = doc["ledger"]
    lrows = ledger_rows(doc)
    body += [
        "<h2 id='ledger'>Ledger</h2>",
        (
            f"<p class='meta'>base model <code>{_e(led['base_model'])}</code> · statistics corpus "
            f"<code>{_e(led['corpus'])}</code>, {_e(led['n_tokens'])} tokens · edit "
            f"{'reused from an earlier run' if doc['edit']['reused'] else 'computed in this run'}</p>"
        ),
        _html_table(["batch", "status", "time", "method", "requests", "seconds", "‖ΔW‖_F per layer"], lrows),
    ]

    body.append("<h2 id='facts'>Facts</h2>")
    for t in doc["targets"]:
        frows = [
            [
                f["kind"],
                f["request_id"],
                f["prompt"],
                f["expected"],
                f.get("other") or "-",
                _signed(f["margin_fp32"]),
                _signed(f["margin_artifact"]),
                _signed(f.get("margin_baseline")),
                "yes" if f["survived"] else "no",
            ]
            for f in t["facts"]
        ]
        fcls = [[""] * 8 + ["ok" if f["survived"] else "bad"] for f in t["facts"]]
        extra = (
            f" · Ollama: <code>ollama create edited -f {_e(t['modelfile'])}</code>" if t["modelfile"] else ""
        )
        body.append(
            f"<details><summary>{_e(t['target'])}: {len(frows)} facts · artifact "
            f"<code>{_e(t['artifact']['path'])}</code>{extra}</summary>"
        )
        body.append(
            _html_table(
                [
                    "kind",
                    "id",
                    "prompt",
                    "expected",
                    "other",
                    "margin fp32",
                    "margin artifact",
                    "margin baseline",
                    "survived",
                ],
                frows,
                fcls,
            )
        )
        body.append("</details>")
    body.append("<h2 id='timings'>Timings (s)</h2>")
    body.append(_html_table(list(doc["timings"]), [[_num(v, ".1f") for v in doc["timings"].values()]]))
    peaks = (doc.get("memory") or {}).get("peak_rss_mib")
    if peaks:
        body.append("<h2 id='memory'>Peak memory (MiB, resident)</h2>")
        body.append(_html_table(list(peaks), [[_num(v, ".0f") for v in peaks.values()]]))
    body.append("</body></html>\n")
    return "".join(body)


def _generation_html(doc: dict) -> list[str]:
    """Teacher-forced and generated rates side by side, and each edited fact's generated text in the artifact."""
    g = generation_tables(doc)
    if g is None:
        return []
    notes = "".join(f"<p class='meta'>{_e(n)}</p>" for n in g.notes)
    return [
        "<h2 id='generated'>Generated answers: teacher-forced (TF) vs generated</h2>",
        _html_table(GEN_HEADERS, g.rates),
        notes,
        "<details><summary>Each edited fact's generated text in the artifact</summary>",
        _html_table(GEN_TEXT_HEADERS, g.texts),
        "</details>",
    ]
