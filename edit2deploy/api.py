"""The Python API: the CLI's operations as functions (each is `edit2deploy.ops`'s one implementation;
`export`, `verify` and `predict` are those functions themselves).

import edit2deploy
result = edit2deploy.run("smollm2-135m", "examples/edits.jsonl", "gguf:Q4_K_M,gguf:Q8_0", "out/run")
art = edit2deploy.export("out/run/model", "out/model-Q5.gguf", "gguf:Q5_K_M")
ver = edit2deploy.verify(art, "out/run/model", gates={"survival": 0.9})
ver.passed, ver.survival
preds = edit2deploy.predict("out/run/model", "Q4_K_M:none,onnx:int4")   # torch-simulated survival, no export
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError
from .formats import Target
from .methods import EditConfig
from .ops import edit as _edit
from .ops import run as _run
from .ops.export import export
from .ops.predict import predict
from .ops.results import RunResult
from .ops.verify import verify
from .requests import EditRequest

__all__ = ["edit", "export", "predict", "run", "verify"]


def run(
    model: str,
    edits: str | Path | Sequence[EditRequest],
    targets: str | Target | Sequence[str | Target],
    out: str | Path,
    **kwargs: Any,
) -> RunResult:
    """`edit2deploy run`: edit, export every target, verify each, write reports. Keyword arguments are
    `ops.run.RunConfig`'s fields (cfg, gates, batch_size, corpus, n_tokens, preserved, heldout, ...)."""
    log = kwargs.pop("log", None)
    if kwargs.get("cfg") is None:
        kwargs.pop("cfg", None)
    known = {f.name for f in dataclasses.fields(_run.RunConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UsageError(f"run: unknown argument(s) {unknown} (expected: {', '.join(sorted(known))})")
    return _run.run(_run.RunConfig(model, edits, targets, out, **kwargs), log=log)


def edit(
    model: str,
    edits: str | Path | Sequence[EditRequest],
    out: str | Path,
    cfg: EditConfig | None = None,
    **kwargs: Any,
) -> _edit.EditRun:
    """`edit2deploy edit`: apply the edits in sequential batches and write the patched model and its ledger."""
    return _edit.edit_model(
        model, list(edits) if not isinstance(edits, (str, Path)) else edits, out, cfg, **kwargs
    )
