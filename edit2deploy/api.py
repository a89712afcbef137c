"""The Python API: the CLI's operations as functions (each is `edit2deploy.ops`'s one implementation).

import edit2deploy
result = edit2deploy.run("smollm2-135m", "examples/edits.jsonl", "gguf:Q4_K_M,gguf:Q8_0", "out/run")
art = edit2deploy.export("out/run/model", "out/model-Q5.gguf", "gguf:Q5_K_M")
ver = edit2deploy.verify(art, "out/run/model", gates={"survival": 0.9})
ver.passed, ver.verification.survival
preds = edit2deploy.predict("out/run/model", "Q4_K_M:none,onnx:int4")   # torch-simulated survival, no export
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .formats import DEFAULT_PROTECTION, Artifact, Protection, Target
from .gates import Verification
from .methods import EditConfig
from .ops import edit as _edit
from .ops import export as _export
from .ops import predict as _predict
from .ops import run as _run
from .ops import verify as _verify
from .ops.results import RunResult
from .quantsim import Prediction
from .requests import EditRequest


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


def export(
    model: str | Path,
    out: str | Path,
    target: str | Target | None = None,
    *,
    format: str | None = None,
    quant: str | None = None,
    protect_edits: Protection | str | None = None,
    patch: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Artifact:
    """`edit2deploy export`: write `model` (an edited HF directory, a .gguf or a built-in name) to `out`.
    `target` is FORMAT:TYPE[:PROTECTION] (e.g. "gguf:Q4_K_M"); or give `format` and `quant`."""
    return _export.export(
        model,
        out,
        target,
        format=format,
        quant=quant,
        protect_edits=protect_edits,
        patch=patch,
        options=options,
    )


def verify(
    artifact: Artifact | str | Path,
    model: str | Path,
    edits: str | Path | Sequence[EditRequest] | None = None,
    *,
    preserved: str | Path | Sequence[EditRequest] | None = None,
    gates: Sequence[str] | Mapping[str, Any] | None = None,
    baseline: bool = True,
) -> Verification:
    """`edit2deploy verify`: score the fact suite in the artifact's own runtime against the fp32 `model`, the
    unedited model and the paired baseline; apply gates. `edits` default: the requests in the model's ledger."""
    return _verify.verify(
        artifact, model, edits, preserved=preserved, gates=gates, baseline=baseline
    ).verification


def predict(
    model: str | Path,
    targets: str | Sequence[str | Target],
    edits: str | Path | Sequence[EditRequest] | None = None,
    *,
    protect_edits: Protection | str = DEFAULT_PROTECTION,
    preserved: str | Path | Sequence[EditRequest] | None = None,
    patch: str | Path | None = None,
) -> list[Prediction]:
    """`edit2deploy predict`: per-fact verdicts of each target (`"Q4_K_M,onnx:int4,bnb:nf4"`), its quantization
    simulated in torch. `edits` default: the requests in the model's ledger."""
    timed = _predict.predict(
        model, targets, edits, protect_edits=protect_edits, preserved=preserved, patch=patch
    )
    return [t.prediction for t in timed]
