"""The report document of a run (report.json; schema in `report_schema.json`): `build_report(result)`.
`edit2deploy.report` renders it as Markdown and HTML and writes all three."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..gates import Perplexity
from ..report import SCHEMA_VERSION
from .results import RunResult, TargetResult


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


def _target_json(t: TargetResult, root: Path, fp32: Perplexity | None, base_fp32: Perplexity | None) -> dict:
    """One target's entry of the report."""
    v = t.verification
    art = t.artifact
    pa, pb = t.perplexity, t.baseline_perplexity
    return {
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
        "generation": None if v.generation is None else v.generation.to_json(),
        "seconds": dict(t.seconds),
    }


def build_report(result: RunResult) -> dict[str, Any]:
    """The report.json document of a run (see report_schema.json)."""
    root = result.out
    fp32 = result.perplexity.get("fp32")
    base_fp32 = result.perplexity.get("base_fp32")
    targets = [_target_json(t, root, fp32, base_fp32) for t in result.targets]
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
        "memory": dict(result.memory),
    }
    return _safe(doc)
