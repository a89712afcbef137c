"""Reports of a run: report.json (machine; schema in `report_schema.json`), report.md and a self-contained
report.html (inline CSS and hand-written inline SVG; no scripts, no network, no images to fetch).

The renderers read only the JSON document (built by `edit2deploy.ops.report.build_report`), so a report can be
re-rendered from a saved report.json (`render_markdown(json.load(...))`).
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from ..atomic import atomic_file, kill_point
from .html import render_html
from .markdown import render_markdown
from .text import SUMMARY_HEADERS, summary_rows

SCHEMA_VERSION = 2  # 2: targets[].generation
SCHEMA_RESOURCE = "report_schema.json"


def load_schema() -> dict:
    return json.loads(
        importlib.resources.files("edit2deploy").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    )


def write_reports(doc: dict, out: Path | str) -> dict[str, Path]:
    """Write report.json, report.md and report.html of the document `doc` into `out` (each atomically)."""
    out = Path(out)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    texts = {
        "json": json.dumps(doc, indent=1, allow_nan=False) + "\n",
        "md": render_markdown(doc),
        "html": render_html(doc),
    }
    for key, path in paths.items():
        with atomic_file(path, "w") as fh:
            fh.write(texts[key])
        kill_point("report")  # between two reports: each is whole, the set may be mixed until the rerun
    return paths


__all__ = [
    "SCHEMA_VERSION",
    "SUMMARY_HEADERS",
    "load_schema",
    "render_html",
    "render_markdown",
    "summary_rows",
    "write_reports",
]
