"""Hand-written inline SVG charts for report.html (no scripts, nothing fetched)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .text import _e

# Colours of the scatter's two series (the screenshot test looks for them; use them nowhere else).
EDITED_COLOUR = "#d62728"
PRESERVED_COLOUR = "#1f77b4"
BATCH_PALETTE = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


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
