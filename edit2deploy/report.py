"""Reports of a `pipeline.run`: report.json (machine; schema in `report_schema.json`), report.md and a
self-contained report.html (inline CSS and hand-written inline SVG; no scripts, no network, no images to fetch).

`build_report(result)` turns a `RunResult` into the JSON document; the Markdown and HTML renderers read only
that document, so a report can be re-rendered from a saved report.json (`render_markdown(json.load(...))`).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import RunResult

SCHEMA_VERSION = 1
SCHEMA_RESOURCE = "report_schema.json"
EDITED_KINDS = ("edit", "paraphrase")
PRESERVED_KINDS = ("neighborhood", "preserved")
RATE_KINDS = ("edit", "paraphrase", "neighborhood", "preserved")
# Colours of the scatter's two series (the screenshot test looks for them; use them nowhere else).
EDITED_COLOUR = "#d62728"
PRESERVED_COLOUR = "#1f77b4"
BATCH_PALETTE = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# ================================================================== JSON
def _safe(obj):
    """JSON has no Infinity/NaN: write them as null; paths as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_safe(v) for v in obj]
    return obj


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _ppl(p) -> dict | None:
    return None if p is None else p.to_json()


def _ledger_json(state: dict, records: Sequence[dict]) -> dict:
    batches, events = [], []
    for r in records:
        if r.get("type") == "batch":
            batches.append(
                {
                    "id": r["id"],
                    "time": r.get("time"),
                    "method": r.get("method"),
                    "seconds": r.get("seconds"),
                    "requests": [q.get("id") for q in r.get("requests", [])],
                    "layers": list(r.get("layers", [])),
                    "tensors": {
                        name: {
                            "layer": t.get("layer"),
                            "delta_fro": t.get("delta_fro"),
                            "fro_from_original": t.get("fro_from_original"),
                        }
                        for name, t in r.get("tensors", {}).items()
                    },
                }
            )
        else:
            events.append(r)
    return {
        "base_model": state.get("base_model"),
        "base_fingerprint": state.get("base_fingerprint"),
        "corpus": state.get("corpus"),
        "n_tokens": state.get("n_tokens"),
        "edited_tensors": list(state.get("edited_tensors", [])),
        "active_batches": list(state.get("batches", [])),
        "batches": batches,
        "events": events,
    }


def build_report(result: RunResult) -> dict[str, Any]:
    """The report.json document of a run (see report_schema.json)."""
    from . import __version__

    root = result.out
    fp32 = result.perplexity.get("fp32")
    base_fp32 = result.perplexity.get("base_fp32")
    targets = []
    for t in result.targets:
        v = t.verification
        art = t.artifact
        pa, pb = t.perplexity, t.baseline_perplexity
        targets.append(
            {
                "target": str(t.target),
                "format": t.target.format,
                "quant": t.target.quant,
                "passed": t.passed,
                "artifact": {
                    "path": _rel(art.path, root),
                    "size_bytes": art.size_bytes,
                    "mode": art.mode,
                    "protect_edits": art.protect_edits,
                    "edited_types": dict(art.edited_types),
                    "type_counts": dict(art.type_counts),
                    "reused": t.export_cached,
                    "seconds": art.seconds,
                },
                "baseline": None
                if t.baseline is None
                else {"path": str(t.baseline.path), "reused": t.baseline_cached},
                "modelfile": _rel(t.modelfile, root),
                "rates": v.rates,
                "survival": v.survival,
                "baseline_agreement": v.baseline_agreement,
                "gates": [
                    {
                        "name": g.name,
                        "value": g.value,
                        "threshold": g.threshold,
                        "passed": g.passed,
                        "detail": g.detail,
                        "failing": list(g.failing),
                    }
                    for g in v.gates
                ],
                "perplexity": {
                    "artifact": _ppl(pa),
                    "baseline": _ppl(pb),
                    "delta_vs_fp32": None if pa is None or fp32 is None else pa.value - fp32.value,
                    "baseline_delta_vs_base_fp32": None
                    if pb is None or base_fp32 is None
                    else pb.value - base_fp32.value,
                },
                "facts": [r.to_json() for r in v.rows],
                "seconds": dict(t.seconds),
            }
        )
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "edit2deploy", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "passed": result.passed,
        "out": str(result.out),
        "model": {
            "spec": result.model,
            "base_model_dir": str(result.base_model_dir),
            "edited_dir": _rel(result.model_dir, root),
        },
        "edits": {
            "source": result.edits,
            "count": len(result.requests),
            "requests": [r.to_json() for r in result.requests],
            "preserved_source": result.preserved_source,
        },
        "edit": {
            "reused": result.edit_cached,
            "note": result.edit_note,
            "method": result.config.get("method"),
            "config": result.config,
            "protect_edits": result.protect_edits,
            "seconds": result.seconds.get("edit", 0.0),
        },
        "heldout": {"source": result.heldout.source, "pairs": len(result.heldout.pairs)},
        "perplexity": {"fp32": _ppl(fp32), "base_fp32": _ppl(base_fp32)},
        "targets": targets,
        "ledger": _ledger_json(result.ledger_state, result.ledger_records),
        "timings": dict(result.seconds),
    }
    return _safe(doc)


def load_schema() -> dict:
    import importlib.resources

    return json.loads(
        importlib.resources.files("edit2deploy").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    )


def write_reports(result: RunResult) -> dict[str, Path]:
    """Write report.json, report.md and report.html into `result.out` (each atomically)."""
    from .atomic import atomic_file

    doc = build_report(result)
    out = Path(result.out)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    texts = {
        "json": json.dumps(doc, indent=1, allow_nan=False) + "\n",
        "md": render_markdown(doc),
        "html": render_html(doc),
    }
    for key, path in paths.items():
        with atomic_file(path, "w") as fh:
            fh.write(texts[key])
    return paths


# ================================================================== shared formatting
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


# ================================================================== Markdown
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
            "Rates are success percentages (edit/paraphrase: the new target beats the old answer; neighbourhood: the old "
            "answer is kept). Survival = share of fact verdicts in the artifact equal to the fp32 edited model's."
        ),
        "",
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
    return "\n".join(lines)


def _ledger_md(doc: dict) -> str:
    led = doc["ledger"]
    rows = [
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
    head = f"Base model `{led['base_model']}`; statistics corpus `{led['corpus']}`, {led['n_tokens']} tokens."
    return (
        head
        + "\n\n"
        + _md_table(["batch", "status", "time", "method", "requests", "seconds", "‖ΔW‖_F"], rows)
    )


# ================================================================== HTML + SVG
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


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


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


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, x = [], start
    while x <= hi + 1e-9:
        ticks.append(round(x, 10))
        x += step
    return ticks


def scatter_svg(
    points: Sequence[tuple[float, float, str, str]], title: str, w: int = 400, h: int = 340
) -> str:
    """fp32 margin (x) vs artifact margin (y); points are (x, y, series "edited"|"preserved", label)."""
    ml, mr, mt, mb = 48, 14, 26, 40
    vals = [abs(v) for p in points for v in p[:2]] or [1.0]
    lim = max(1.0, max(vals) * 1.08)
    lo, hi = -lim, lim

    def sx(x):
        return ml + (x - lo) / (hi - lo) * (w - ml - mr)

    def sy(y):
        return h - mb - (y - lo) / (hi - lo) * (h - mt - mb)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img'>",
        f"<title>{_e(title)}</title>",
        f"<rect x='{ml}' y='{mt}' width='{w - ml - mr}' height='{h - mt - mb}' fill='#fbfcfd' stroke='#d0d7de'/>",
    ]
    # quadrants where the verdict flips (fp32 and artifact disagree in sign) shaded
    parts.append(
        f"<rect x='{sx(0):.1f}' y='{sy(0):.1f}' width='{sx(hi) - sx(0):.1f}' height='{sy(lo) - sy(0):.1f}' "
        "fill='#fff1f0'/>"
    )
    parts.append(
        f"<rect x='{sx(lo):.1f}' y='{sy(hi):.1f}' width='{sx(0) - sx(lo):.1f}' height='{sy(0) - sy(hi):.1f}' "
        "fill='#fff1f0'/>"
    )
    for t in _nice_ticks(lo, hi):
        parts.append(
            f"<line x1='{sx(t):.1f}' y1='{h - mb}' x2='{sx(t):.1f}' y2='{h - mb + 4}' stroke='#57606a'/>"
            f"<text x='{sx(t):.1f}' y='{h - mb + 15}' text-anchor='middle'>{t:g}</text>"
        )
        parts.append(
            f"<line x1='{ml - 4}' y1='{sy(t):.1f}' x2='{ml}' y2='{sy(t):.1f}' stroke='#57606a'/>"
            f"<text x='{ml - 6}' y='{sy(t) + 4:.1f}' text-anchor='end'>{t:g}</text>"
        )
    parts.append(
        f"<line x1='{sx(0):.1f}' y1='{mt}' x2='{sx(0):.1f}' y2='{h - mb}' stroke='#8c959f' stroke-dasharray='3 3'/>"
    )
    parts.append(
        f"<line x1='{ml}' y1='{sy(0):.1f}' x2='{w - mr}' y2='{sy(0):.1f}' stroke='#8c959f' stroke-dasharray='3 3'/>"
    )
    parts.append(
        f"<line x1='{sx(lo):.1f}' y1='{sy(lo):.1f}' x2='{sx(hi):.1f}' y2='{sy(hi):.1f}' stroke='#8c959f'/>"
    )
    parts.append(
        f"<text x='{(ml + w - mr) / 2:.0f}' y='{h - 6}' text-anchor='middle'>margin in fp32 (nats/token)</text>"
    )
    parts.append(
        f"<text x='12' y='{(mt + h - mb) / 2:.0f}' text-anchor='middle' "
        f"transform='rotate(-90 12 {(mt + h - mb) / 2:.0f})'>margin in the artifact</text>"
    )
    parts.append(f"<text x='{ml}' y='16' font-weight='600'>{_e(title)}</text>")
    for series, colour in (("preserved", PRESERVED_COLOUR), ("edited", EDITED_COLOUR)):
        for x, y, s, label in points:
            if s == series:
                parts.append(
                    f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='4.5' fill='{colour}' fill-opacity='1'>"
                    f"<title>{_e(label)}: fp32 {x:+.2f}, artifact {y:+.2f}</title></circle>"
                )
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(
    groups: Sequence[str],
    series: Sequence[str],
    values: dict[tuple[str, str], float],
    title: str,
    ylabel: str,
    w: int = 560,
    h: int = 280,
) -> str:
    """Grouped vertical bars: one group per `groups` entry, one bar per `series` entry."""
    ml, mr, mt, mb = 52, 130, 26, 36
    top = max([v for v in values.values() if v is not None] or [1.0]) * 1.1 or 1.0
    pw, ph = w - ml - mr, h - mt - mb
    gw = pw / max(1, len(groups))
    bw = min(gw * 0.8 / max(1, len(series)), 48.0)
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img'>",
        f"<title>{_e(title)}</title>",
        f"<text x='{ml}' y='16' font-weight='600'>{_e(title)}</text>",
        f"<line x1='{ml}' y1='{mt + ph}' x2='{ml + pw}' y2='{mt + ph}' stroke='#57606a'/>",
        f"<line x1='{ml}' y1='{mt}' x2='{ml}' y2='{mt + ph}' stroke='#57606a'/>",
    ]
    for t in _nice_ticks(0, top, 4):
        y = mt + ph - t / top * ph
        parts.append(
            f"<line x1='{ml - 4}' y1='{y:.1f}' x2='{ml + pw}' y2='{y:.1f}' stroke='#eaeef2'/>"
            f"<text x='{ml - 6}' y='{y + 4:.1f}' text-anchor='end'>{t:g}</text>"
        )
    for gi, g in enumerate(groups):
        x0 = ml + gi * gw + (gw - bw * len(series)) / 2
        for si, s in enumerate(series):
            v = values.get((g, s))
            if v is None:
                continue
            bh = v / top * ph
            parts.append(
                f"<rect x='{x0 + si * bw:.1f}' y='{mt + ph - bh:.1f}' width='{max(1.0, bw - 1):.1f}' "
                f"height='{bh:.1f}' fill='{BATCH_PALETTE[si % len(BATCH_PALETTE)]}'>"
                f"<title>{_e(g)} {_e(s)}: {v:.4g}</title></rect>"
            )
        parts.append(
            f"<text x='{ml + gi * gw + gw / 2:.1f}' y='{mt + ph + 14}' text-anchor='middle'>{_e(g)}</text>"
        )
    parts.append(f"<text x='{ml + pw / 2:.0f}' y='{h - 4}' text-anchor='middle'>{_e(ylabel)}</text>")
    for si, s in enumerate(series):
        y = mt + 10 + si * 16
        parts.append(
            f"<rect x='{ml + pw + 12}' y='{y - 9}' width='10' height='10' "
            f"fill='{BATCH_PALETTE[si % len(BATCH_PALETTE)]}'/><text x='{ml + pw + 26}' y='{y}'>{_e(s)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def hbars_svg(items: Sequence[tuple[str, float | None, str]], title: str, w: int = 560) -> str:
    """Horizontal bars (label, value, colour) with the value printed."""
    ml, mr, mt, row = 190, 70, 26, 22
    h = mt + row * len(items) + 10
    vmax = max([v for _, v, _ in items if v is not None] or [1.0]) or 1.0
    pw = w - ml - mr
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img'>",
        f"<title>{_e(title)}</title>",
        f"<text x='4' y='16' font-weight='600'>{_e(title)}</text>",
    ]
    for i, (label, v, colour) in enumerate(items):
        y = mt + i * row
        parts.append(f"<text x='{ml - 6}' y='{y + 14}' text-anchor='end'>{_e(label)}</text>")
        if v is not None:
            bw = v / vmax * pw
            parts.append(
                f"<rect x='{ml}' y='{y + 3}' width='{bw:.1f}' height='{row - 6}' fill='{colour}'/>"
                f"<text x='{ml + bw + 4:.1f}' y='{y + 14}'>{v:.2f}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


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
            "Δppl = artifact perplexity − fp32 edited perplexity.</p>"
        ),
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
    lrows = [
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
    body.append("</body></html>\n")
    return "".join(body)
