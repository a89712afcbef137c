"""Typed results passed between the stages of a run and to its report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..formats import DEFAULT_PROTECTION, Artifact, Target
from ..gates import Gates, Perplexity, Verification
from ..ledger import Ledger
from ..requests import EditRequest
from .scores import HeldOut


@dataclass
class EditStage:
    """The edited model a run works from: made now, or reused from an earlier run."""

    model_dir: Path  # out/model
    base_model_dir: Path  # the unedited model (paired baselines, base fp32)
    base_fingerprint: str
    source_fingerprint: str  # of the edited weights: what every export is made from
    ledger: Ledger
    cached: bool
    note: str  # why editing ran (or "reused")
    seconds: float
    # the largest peak of the edit's own stages (load, statistics, batches, write); None when reused
    peak_rss_mib: float | None = None


@dataclass
class ExportStage:
    """One target's artifact and its paired baseline."""

    target: Target
    artifact: Artifact
    cached: bool
    baseline: Artifact | None = None
    baseline_cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class TargetResult:
    """What one target produced and how it verified."""

    target: Target
    artifact: Artifact
    verification: Verification
    gates: Gates
    baseline: Artifact | None = None
    perplexity: Perplexity | None = None  # the artifact
    baseline_perplexity: Perplexity | None = None  # the paired baseline
    export_cached: bool = False
    baseline_cached: bool = False
    modelfile: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verification.passed


@dataclass
class RunResult:
    """Everything `run` did; `ops.report.build_report(result)` is its JSON form."""

    out: Path
    model: str  # what the user named
    edits: str  # where the requests came from
    model_dir: Path  # out/model
    base_model_dir: Path  # the unedited model (paired baselines, base fp32)
    requests: list[EditRequest]
    config: dict
    edit_cached: bool
    edit_note: str  # why editing ran (or "reused")
    ledger_state: dict
    ledger_records: list[dict]
    heldout: HeldOut
    perplexity: dict[str, Perplexity]  # "fp32" (edited), "base_fp32"
    targets: list[TargetResult]
    seconds: dict[str, float]
    reports: dict[str, Path] = field(default_factory=dict)
    protect_edits: str = DEFAULT_PROTECTION.value
    preserved_source: str | None = None
    memory: dict = field(default_factory=dict)  # `PeakMemory.to_json()` of the run's stages

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.targets)
