"""The Python API that mirrors the CLI (`edit2deploy.run`, `.export`, `.verify`; `.Editor` is the methods' class).

import edit2deploy
result = edit2deploy.run("smollm2-135m", "examples/edits.jsonl", "gguf:Q4_K_M,gguf:Q8_0", "out/run")
art = edit2deploy.export("out/run/model", "out/model-Q5.gguf", "gguf:Q5_K_M")
ver = edit2deploy.verify(art, "out/run/model", gates={"survival": 0.9})
ver.passed, ver.survival
preds = edit2deploy.predict("out/run/model", "Q4_K_M:none,onnx:int4")   # torch-simulated survival, no export
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .exporters import Artifact
    from .pipeline import RunResult
    from .quantsim import Prediction
    from .requests import EditRequest
    from .verify import Verification


def run(
    model: str,
    edits: str | Path | list[EditRequest],
    targets: str | Sequence[str],
    out: str | Path,
    **kwargs: Any,
) -> RunResult:
    """`edit2deploy run`: edit, export every target, verify each, write reports. See `pipeline.run`."""
    from .pipeline import run as _run

    return _run(model, edits, targets, out, **kwargs)


def export(
    model: str | Path,
    out: str | Path,
    target: str | None = None,
    *,
    format: str | None = None,
    quant: str | None = None,
    protect_edits: str = "q8_0",
    patch: str | Path | None = None,
) -> Artifact:
    """`edit2deploy export`: write `model` (an edited HF directory, a .gguf or a built-in name) to `out`.

    `target` is FORMAT:TYPE (e.g. "gguf:Q4_K_M"); or give `format` and `quant`. `patch`: gguf patch mode base.
    """
    from .exporters import get_format
    from .models import resolve_model_dir

    if target is not None:
        if format is not None or quant is not None:
            raise UsageError("export: give either target='FORMAT:TYPE' or format= and quant=, not both")
        format, _, quant = str(target).partition(":")
        quant = quant or None
    if format is None:
        raise UsageError("export: no format (expected target='gguf:Q4_K_M' or format='gguf')")
    exporter = get_format(format)
    kwargs = {"patch_base": patch} if patch is not None else {}
    if quant is None and patch is None:
        raise UsageError(f"export: no type given (one of: {', '.join(exporter.quants())})")
    return exporter.export(resolve_model_dir(model), out, quant, protect_edits, **kwargs)


def verify(
    artifact: Artifact | str | Path,
    model: str | Path,
    edits: str | Path | Sequence[EditRequest] | None = None,
    *,
    preserved: str | Path | Sequence[EditRequest] | None = None,
    gates: Sequence[str] | Mapping[str, Any] | None = None,
    baseline: bool = True,
) -> Verification:
    """`edit2deploy verify`: score the fact suite in the artifact's own runtime against the fp32 `model` it was
    exported from, the unedited model and the paired baseline (exported and cached on first use); apply gates.

    `edits` default: the requests in the model's ledger. `gates`: NAME=VALUE strings or a mapping (None/'off'
    disables a gate).
    """
    from .exporters import FORMATS, Artifact, detect_format
    from .ledger import Ledger
    from .models import open_model, resolve_model_dir
    from .pipeline import gates_for, paired_baseline, split_gates
    from .scoring import TorchScorer
    from .verify import verify as _verify

    path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    fmt = detect_format(path)
    if fmt is None:
        raise UsageError(f"{path}: not a recognised artifact (formats: {', '.join(FORMATS)})")
    exporter = FORMATS[fmt]
    art = exporter.load(path)
    items, own = split_gates(gates)
    if own:
        raise UsageError(
            f"verify: gate(s) {', '.join(own)} exist only in run (they need the perplexity probe)"
        )
    g = gates_for(exporter, art.quant, items)
    lm = open_model(model)
    ledger = Ledger.load(lm.model_dir)
    if edits is None:
        if ledger is None:
            raise UsageError(
                f"verify: edits= is required ({model} has no edit ledger to take the requests from)"
            )
        requests = ledger.active_requests()
    else:
        requests = _requests(edits)
    extra = _requests(preserved) if preserved else []
    reference = TorchScorer(lm.model, lm.tokenizer)
    base_ref = base_scorer = None
    if ledger is not None:
        base_lm = open_model(ledger.state["base_model"])
        base_ref = TorchScorer(base_lm.model, base_lm.tokenizer)
        if baseline:
            base_dir = resolve_model_dir(ledger.state["base_model"])
            base_art, _ = paired_baseline(exporter, art, base_dir, ledger.state["base_fingerprint"])
            base_scorer = exporter.scorer(base_art)
    scorer = exporter.scorer(art)
    try:
        return _verify(requests, reference, scorer, base_ref, base_scorer, extra, g, lm.tokenizer.decode)
    finally:
        for s in (scorer, base_scorer):
            close = getattr(s, "close", None)
            if close is not None:
                close()


def predict(
    model: str | Path,
    quant: str | Sequence[str],
    edits: str | Path | Sequence[EditRequest] | None = None,
    *,
    protect_edits: str = "q8_0",
    preserved: str | Path | Sequence[EditRequest] | None = None,
    patch: str | Path | None = None,
) -> list[Prediction]:
    """`edit2deploy predict`: per-fact verdicts of each target (`"Q4_K_M,onnx:int4,bnb:nf4"`), its quantization
    simulated in torch (see `edit2deploy.quantsim`). `edits` default: the requests in the model's ledger."""
    from .checks import run_probes
    from .cli_predict import build_scheme, ledger_requests, parse_schemes
    from .models import open_model
    from .quantsim import Simulation, suite
    from .quantsim import predict as _predict
    from .scoring import TorchScorer

    specs = parse_schemes(quant, protect_edits)
    lm = open_model(model)
    if edits is None:
        requests = ledger_requests(lm.model_dir)
        if requests is None:
            raise UsageError(
                f"predict: edits= is required ({model} has no edit ledger to take the facts from)"
            )
    else:
        requests = _requests(edits)
    extra = _requests(preserved) if preserved else []
    probes = suite(requests, extra)
    reference = run_probes(TorchScorer(lm.model, lm.tokenizer), probes, lm.tokenizer.decode)
    base = Path(patch) if patch is not None else None
    return [
        _predict(
            Simulation(lm, build_scheme(s, lm.model_dir, base if s.format == "gguf" else None)),
            probes,
            reference,
        )
        for s in specs
    ]


def _requests(source: str | Path | Sequence[EditRequest]) -> list[EditRequest]:
    """Requests from an edit file, or the given ones."""
    from .requests import load_requests

    return load_requests(source) if isinstance(source, (str, Path)) else list(source)
