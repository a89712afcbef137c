"""Predict: per-fact verdicts of deployment targets, their quantization simulated in torch before exporting.
One implementation for `edit2deploy predict` and the Python API; `edit --harden-for` and `run --harden` build
their schemes here too."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UsageError
from ..formats import DEFAULT_PROTECTION, Protection, Target, get_format, parse_targets
from ..models import LoadedModel, open_model
from ..probes import run_probes
from ..quantsim import Prediction, QuantScheme, Simulation, suite
from ..quantsim import predict as simulate
from ..requests import EditRequest
from ..scoring import TorchScorer
from .verify import ledger_requests, requests_from


def build_scheme(target: Target, model_dir: Path, patch_base: Path | None = None, **kwargs) -> QuantScheme:
    """The `QuantScheme` of a target for a model directory (from the format's simulator)."""
    if patch_base is not None:
        kwargs["patch_base"] = patch_base
    return get_format(target.format).scheme(model_dir, target.quant, target.policy, **kwargs)


def scheme_factories(targets: Sequence[Target]) -> list[Callable[[LoadedModel, Sequence[str]], QuantScheme]]:
    """For hardening: one factory per target, called with the model being edited and its edited tensors."""

    def factory(target: Target):
        return lambda lm, edited: build_scheme(target, lm.model_dir, edited_tensors=edited)

    return [factory(t) for t in targets]


def predict(
    model: str | Path,
    targets: str | Sequence[str | Target],
    edits: str | Path | Sequence[EditRequest] | None = None,
    *,
    protect_edits: Protection | str = DEFAULT_PROTECTION,
    preserved: str | Path | Sequence[EditRequest] | None = None,
    patch: str | Path | None = None,
    limit: int | None = None,
    preserved_n: int | None = None,
    device: str = "cpu",
    on_each: Callable[[Prediction, float], None] | None = None,
) -> list[Prediction]:
    """Per-fact predicted verdicts of each target (`"Q4_K_M,onnx:int4,bnb:nf4"`) vs full precision.
    `edits` default: the requests in the model's ledger. `patch`: predict a gguf patch export over this base.
    `on_each(prediction, seconds)` is called as each target is done."""
    specs = parse_targets(targets, protect_edits, "--targets")
    base = Path(patch) if patch is not None else None
    if base is not None and not base.is_file():
        raise UsageError(f"--patch {base}: file not found")
    extra = requests_from(preserved, preserved_n)
    lm = open_model(model, device=device)
    requests = requests_from(edits, limit) if edits is not None else ledger_requests(lm.model_dir, "edits")
    probes = suite(requests, extra)
    reference = run_probes(TorchScorer(lm.model, lm.tokenizer), probes, lm.tokenizer.decode)
    out = []
    for spec in specs:
        t = time.perf_counter()
        scheme = build_scheme(spec, lm.model_dir, base if spec.format == "gguf" else None)
        pred = simulate(Simulation(lm, scheme), probes, reference)
        if on_each is not None:
            on_each(pred, round(time.perf_counter() - t, 2))
        out.append(pred)
    return out
