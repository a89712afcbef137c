"""Verify: one implementation for `edit2deploy verify`, the Python API and `run`.

`check_artifact` scores one artifact against the references it is given (edited fp32, unedited fp32, the
artifact's paired baseline) and applies the gates. `verify` is the user-facing operation: it finds the
artifact's format, opens the references, gets the paired baseline, and calls `check_artifact`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..formats import FORMATS, Artifact, Format, detect_format
from ..gates import Gates, Perplexity, Verification, generation_gates, perplexity, perplexity_gate
from ..gates import verify as score_and_gate
from ..generation import DEFAULT_GENERATION, GenerationSettings, check_generation
from ..ledger import Ledger
from ..models import resolve_model_dir
from ..requests import EditRequest, load_requests
from .baseline import paired_baseline
from .scores import (
    CachedScorer,
    HeldOut,
    OpenSlot,
    artifact_factory,
    file_identity,
    load_heldout,
    scores_store,
    torch_factory,
)
from .settings import gate_value_ok


def parse_gates(items: Sequence[str] | Mapping[str, Any] | None, base: Gates | None = None) -> Gates:
    """Gate settings (NAME=VALUE strings, or a mapping; 'off', None or False disables a gate) over `base`."""
    if items is None:
        return base or Gates()
    if isinstance(items, Mapping):
        bad = next((k for k, v in items.items() if not gate_value_ok(v)), None)
        if bad is not None:  # a quoted number is a string, not a threshold
            raise UsageError(f"gates: field '{bad}': expected a number ≥ 0 or 'off', got {items[bad]!r}")
        items = [f"{k}={'off' if v is None or v is False else v}" for k, v in items.items()]
    return Gates.parse([str(i) for i in items], base)


def gates_for(fmt: Format, quant: str, items: Sequence[str] | Mapping[str, Any] | None) -> Gates:
    """The format's default gates for `quant`, overridden by `items`."""
    return parse_gates(items, fmt.default_gates(quant))


@dataclass
class ArtifactCheck:
    """What verifying one artifact gave: the verification (rates, survival, gates) and held-out perplexities."""

    verification: Verification
    perplexity: Perplexity | None = None  # the artifact
    baseline_perplexity: Perplexity | None = None  # its paired baseline


def check_artifact(
    fmt: Format,
    art: Artifact,
    requests: Sequence[EditRequest],
    reference: CachedScorer,
    base_reference: CachedScorer | None,
    base_art: Artifact | None,
    gates: Gates,
    decode: Callable,
    preserved: Sequence[EditRequest] = (),
    heldout: HeldOut | None = None,
    cache_key: dict | None = None,
    generation: GenerationSettings | None = DEFAULT_GENERATION,
    slot: OpenSlot | None = None,
) -> ArtifactCheck:
    """Score the fact suite in the artifact's runtime (and its paired baseline's) against the references, run the
    generation probes in all four places (unless `generation` is None), apply the gates, and measure held-out
    perplexity when `heldout` is given or the perplexity gate is on.

    `cache_key`: remember the artifact's scores on disk under this key plus the files' identity (`run` does;
    a rerun with unchanged artifacts then opens no runtime). `slot`: the references' `OpenSlot`, shared with the
    artifact's scorers so that one runtime at a time is open."""
    scorer = _artifact_scorer(fmt, art, cache_key, slot)
    base_scorer = (
        None
        if base_art is None
        else _artifact_scorer(fmt, base_art, cache_key and {"baseline_of": cache_key}, slot)
    )
    try:
        ver = score_and_gate(
            requests, reference, scorer, base_reference, base_scorer, preserved, gates, decode
        )
        if generation is not None:
            places = {"fp32": reference, "artifact": scorer}
            if base_reference is not None:
                places["base_fp32"] = base_reference
            if base_scorer is not None:
                places["baseline"] = base_scorer
            ver.generation = check_generation(requests, places, generation)
        ver.gates.extend(generation_gates(gates, ver.generation))
        if heldout is None and gates.perplexity_increase is not None:
            heldout = load_heldout()
        art_ppl = base_ppl = None
        if heldout is not None:
            art_ppl = perplexity(scorer, heldout.pairs)
            base_ppl = perplexity(base_scorer, heldout.pairs) if base_scorer is not None else None
    finally:
        scorer.close()
        if base_scorer is not None:
            base_scorer.close()
    if gates.perplexity_increase is not None:
        ver.gates.append(perplexity_gate(gates.perplexity_increase, art_ppl, base_ppl))
    return ArtifactCheck(ver, art_ppl, base_ppl)


def _artifact_scorer(
    fmt: Format, art: Artifact, cache_key: dict | None, slot: OpenSlot | None = None
) -> CachedScorer:
    if cache_key is None:
        return CachedScorer(artifact_factory(fmt, art), slot=slot)
    key = {**cache_key, "record": art.to_json(), **file_identity(art.path)}
    return CachedScorer(artifact_factory(fmt, art), scores_store(fmt.name, key), key, slot)


@dataclass
class VerifyResult:
    """`verify`'s answer: the artifact, its paired baseline (if made), the thresholds applied and what checking
    it gave (`rows`, `rates`, `survival`, `baseline_agreement`, `gates` are the verification's)."""

    artifact: Artifact
    baseline: Artifact | None
    check: ArtifactCheck
    thresholds: Gates

    @property
    def verification(self) -> Verification:
        return self.check.verification

    @property
    def passed(self) -> bool:
        return self.verification.passed

    @property
    def rows(self):
        return self.verification.rows

    @property
    def rates(self) -> dict:
        return self.verification.rates

    @property
    def survival(self) -> dict:
        return self.verification.survival

    @property
    def baseline_agreement(self) -> float | None:
        return self.verification.baseline_agreement

    @property
    def gates(self):
        return self.verification.gates

    def to_json(self) -> dict:
        return {"artifact": self.artifact.to_json(), **self.verification.to_json()}


def load_artifact(artifact: Artifact | str | Path) -> tuple[Format, Artifact]:
    """The format and record of an artifact given as a record or a path."""
    path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    if not path.exists():
        raise UsageError(f"--artifact {path}: not found")
    name = detect_format(path)
    if name is None:
        raise UsageError(f"--artifact {path}: not a recognised artifact (formats: {', '.join(FORMATS)})")
    fmt = FORMATS[name]
    return fmt, fmt.load(path)


def requests_from(
    source: str | Path | Sequence[EditRequest] | None, limit: int | None = None
) -> list[EditRequest]:
    """Requests from an edit file, or the given ones (none: an empty list)."""
    if source is None:
        return []
    return load_requests(source, limit=limit) if isinstance(source, (str, Path)) else list(source)


def ledger_requests(model_dir: Path, what: str) -> list[EditRequest]:
    """The requests of the active batches of an edited model; a usage error when it has no ledger."""
    ledger = Ledger.load(model_dir)
    if ledger is None:
        raise UsageError(f"{what} is required: {model_dir} has no edit ledger to take the requests from")
    return ledger.active_requests()


def verify(
    artifact: Artifact | str | Path,
    model: str | Path,
    edits: str | Path | Sequence[EditRequest] | None = None,
    *,
    preserved: str | Path | Sequence[EditRequest] | None = None,
    gates: Sequence[str] | Mapping[str, Any] | None = None,
    baseline: bool = True,
    limit: int | None = None,
    preserved_n: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda m: None,
    generation: GenerationSettings | None = DEFAULT_GENERATION,
) -> VerifyResult:
    """Score the fact suite in the artifact's own runtime against the fp32 `model` it was exported from, the
    unedited model and the paired baseline (exported and cached on first use); apply the gates.

    `edits` default: the requests in the model's ledger. `gates`: NAME=VALUE strings or a mapping."""
    from transformers import AutoTokenizer

    fmt, art = load_artifact(artifact)
    g = gates_for(fmt, art.quant, gates)
    extra = requests_from(preserved, preserved_n)
    model_dir = resolve_model_dir(model)
    requests = requests_from(edits, limit) if edits is not None else ledger_requests(model_dir, "edits")
    ledger = Ledger.load(model_dir)
    if ledger is not None:  # scores of weights the ledger does not describe would be reported as the edit's
        ledger.check_weights(model_dir, "verify")
    reference = CachedScorer(torch_factory(model_dir, device))
    base_reference = base_art = None
    if ledger is not None:
        base_dir = resolve_model_dir(ledger.state["base_model"])
        base_reference = CachedScorer(torch_factory(base_dir, device))
        if baseline:
            base_art, _ = paired_baseline(fmt, art, base_dir, ledger.state["base_fingerprint"], log)
    decode = AutoTokenizer.from_pretrained(model_dir).decode
    try:
        check = check_artifact(
            fmt, art, requests, reference, base_reference, base_art, g, decode, extra, generation=generation
        )
    finally:
        reference.close()
        if base_reference is not None:
            base_reference.close()
    return VerifyResult(art, base_art, check, g)
