"""Verification of an exported artifact, written once against the `Scorer` protocol.

Each probe (edited prompt, paraphrase, neighbourhood, preserved fact) is scored in four places:
the edited fp32 model (reference), the artifact, the unedited fp32 model, and the paired baseline
(the unedited model exported the same way). Survival is the fraction of probes whose verdict in
the artifact equals the fp32 verdict; the paired baseline separates what quantization does to any
model from what it does to the edits. Gates turn the numbers into an exit code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .generation import GenerationCheck
from .probes import EDITED_KINDS, PRESERVED_KINDS, RATE_KINDS, Probe, ProbeResult, probes_for, run_probes
from .requests import EditRequest
from .scoring import Scorer


@dataclass(frozen=True)
class Gates:
    """Thresholds; a gate set to None is not checked."""

    survival: float | None = 0.95  # min fraction of all probe verdicts equal to fp32
    specificity_drop: float | None = (
        5.0  # max points neighbourhood(baseline artifact) − neighbourhood(artifact)
    )
    efficacy: float | None = None  # min efficacy (0-100) in the artifact
    # Relative edited-fact gate (for lossy formats): survival of edited probes ≥ the paired baseline's
    # agreement with fp32 on preserved probes − this many points.
    relative_margin: float | None = None
    # max percent the artifact's held-out perplexity may exceed its paired baseline's (off by default)
    perplexity_increase: float | None = None
    # generated text (generation.py); not measured (generation off, no chat template): passed, and the detail says
    # so. min share (0-1) of edited facts whose chat reply to the edit prompt gives the new answer in the artifact:
    chat_efficacy: float | None = 0.8
    generation_survival: float | None = 0.9  # min share (0-1) of generated verdicts equal to fp32's

    @classmethod
    def parse(cls, items: Sequence[str], base: Gates | None = None) -> Gates:
        """`name=value` strings (value `off` disables a gate)."""
        from dataclasses import replace

        from .errors import UsageError

        g = base or cls()
        names = set(cls.__dataclass_fields__)
        for item in items:
            name, _, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name not in names or not value:
                raise UsageError(
                    f"--gate {item}: expected NAME=VALUE with NAME one of {', '.join(sorted(names))}"
                )
            if value.strip() == "off":
                g = replace(g, **{name: None})
                continue
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"--gate {item}: '{value}' is not a number (or 'off')") from None
            if not math.isfinite(number) or number < 0:  # a NaN threshold would fail or pass every check
                raise UsageError(f"--gate {item}: expected a finite number ≥ 0 (or 'off'), got {value}")
            g = replace(g, **{name: number})
        return g


@dataclass(frozen=True)
class Perplexity:
    value: float
    n_tokens: int

    def to_json(self) -> dict:
        return {"value": self.value, "n_tokens": self.n_tokens}


def perplexity(scorer: Scorer, pairs: Sequence[tuple[str, str]]) -> Perplexity:
    """exp(−mean log p) over every continuation token of the (prompt, continuation) pairs."""
    scored = scorer.score(list(pairs))
    n = sum(len(s.logprobs) for s in scored)
    total = sum(s.total for s in scored)
    return Perplexity(math.exp(-total / max(1, n)), n)


def perplexity_gate(limit: float, art: Perplexity | None, base: Perplexity | None) -> GateResult:
    """Artifact perplexity at most `limit` percent above its paired baseline's."""
    if art is None or base is None:
        return GateResult(
            "perplexity_increase", None, limit, False, "perplexity not measured (no paired baseline)"
        )
    inc = 100.0 * (art.value / base.value - 1.0)
    return GateResult(
        "perplexity_increase",
        inc,
        limit,
        inc <= limit,
        f"perplexity {art.value:.2f} vs paired baseline {base.value:.2f}: {inc:+.1f}% (allowed ≤ {limit}%)",
    )


def generation_gates(gates: Gates, check: GenerationCheck | None) -> list[GateResult]:
    """The gates on generated text (`chat_efficacy`, `generation_survival`), where set."""
    out = []
    if gates.chat_efficacy is not None:
        rate = None if check is None else check.rates.get("artifact", {}).get("chat_prompt_new")
        value = None if rate is None else rate / 100
        failing = (
            []
            if check is None
            else [
                f"chat:{r.probe.request_id}: {r.probe.text}"
                for r in check.rows
                if r.probe.kind == "chat" and r.probe.source == "prompt" and r.by["artifact"].verdict != "new"
            ]
        )
        detail = (
            "not measured: no chat replies (generation off, or the model has no chat template)"
            if value is None
            else (
                f"chat replies to the edit prompt giving the new answer: {value:.3f} (need ≥ {gates.chat_efficacy})"
            )
        )
        out.append(
            GateResult(
                "chat_efficacy",
                value,
                gates.chat_efficacy,
                value is None or value >= gates.chat_efficacy,
                detail,
                failing,
            )
        )
    if gates.generation_survival is not None:
        value = None if check is None else check.survival
        failing = (
            []
            if check is None
            else [
                f"{r.probe.kind}:{r.probe.request_id}: {r.probe.text}"
                for r in check.rows
                if r.survived is False
            ]
        )
        detail = (
            "not measured: no generated verdicts to compare (generation off)"
            if value is None
            else (f"generated verdicts equal to fp32: {value:.3f} (need ≥ {gates.generation_survival})")
        )
        out.append(
            GateResult(
                "generation_survival",
                value,
                gates.generation_survival,
                value is None or value >= gates.generation_survival,
                detail,
                failing,
            )
        )
    return out


def preserved_probes(requests: Sequence[EditRequest]) -> list[Probe]:
    """Unedited facts as probes: the true answer should keep beating the counterfactual."""
    return [Probe(r.id, "preserved", r.text, r.target_true, r.target_new) for r in requests if r.target_true]


@dataclass
class ProbeRow:
    probe: Probe
    fp32: ProbeResult
    artifact: ProbeResult
    base_fp32: ProbeResult | None
    baseline: ProbeResult | None

    @property
    def survived(self) -> bool:
        return self.fp32.success == self.artifact.success

    def to_json(self) -> dict:
        def margin(r: ProbeResult | None):
            if r is None:
                return None
            m = r.margin
            return m if math.isfinite(m) else None

        return {
            **asdict(self.probe),
            "margin_fp32": margin(self.fp32),
            "margin_artifact": margin(self.artifact),
            "margin_base_fp32": margin(self.base_fp32),
            "margin_baseline": margin(self.baseline),
            "success_fp32": self.fp32.success,
            "success_artifact": self.artifact.success,
            "success_base_fp32": None if self.base_fp32 is None else self.base_fp32.success,
            "success_baseline": None if self.baseline is None else self.baseline.success,
            "survived": self.survived,
            "top1_artifact": self.artifact.top1,
        }


@dataclass
class GateResult:
    name: str
    value: float | None
    threshold: float
    passed: bool
    detail: str
    failing: list[str] = field(default_factory=list)  # "kind:id: prompt"


@dataclass
class Verification:
    rows: list[ProbeRow]
    rates: dict[str, dict[str, float | None]]  # scorer -> kind -> success rate (0-100)
    survival: dict[str, float | None]  # all / edited / preserved (0-1)
    baseline_agreement: float | None  # paired baseline vs unedited fp32, preserved probes (0-1)
    gates: list[GateResult]
    generation: GenerationCheck | None = None  # generated text in every place (None: not generated)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "rates": self.rates,
            "survival": self.survival,
            "baseline_agreement": self.baseline_agreement,
            "gates": [asdict(g) for g in self.gates],
            "facts": [r.to_json() for r in self.rows],
            "generation": None if self.generation is None else self.generation.to_json(),
        }


def _rates(results: Sequence[ProbeResult]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for kind in RATE_KINDS:
        sel = [r.success for r in results if r.probe.kind == kind]
        out[kind] = 100.0 * sum(sel) / len(sel) if sel else None
    return out


def _fraction(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _label(row: ProbeRow) -> str:
    return f"{row.probe.kind}:{row.probe.request_id}: {row.probe.prompt}"


def verify(
    requests: Sequence[EditRequest],
    reference: Scorer,
    artifact: Scorer,
    base_reference: Scorer | None = None,
    baseline: Scorer | None = None,
    preserved: Sequence[EditRequest] = (),
    gates: Gates | None = None,
    decode=None,
) -> Verification:
    """Score the fact suite everywhere and apply the gates."""
    gates = gates or Gates()
    probes = probes_for(requests) + preserved_probes(preserved)
    ref = run_probes(reference, probes, decode)
    art = run_probes(artifact, probes, decode)
    base = run_probes(base_reference, probes, decode) if base_reference is not None else [None] * len(probes)
    pair = run_probes(baseline, probes, decode) if baseline is not None else [None] * len(probes)
    rows = [ProbeRow(p, r, a, b, q) for p, r, a, b, q in zip(probes, ref, art, base, pair)]

    rates = {"fp32": _rates(ref), "artifact": _rates(art)}
    if base_reference is not None:
        rates["base_fp32"] = _rates(base)
    if baseline is not None:
        rates["baseline"] = _rates(pair)
    survival = {
        "all": _fraction([r.survived for r in rows]),
        "edited": _fraction([r.survived for r in rows if r.probe.kind in EDITED_KINDS]),
        "preserved": _fraction([r.survived for r in rows if r.probe.kind in PRESERVED_KINDS]),
    }
    agreement = None
    if baseline is not None and base_reference is not None:
        agreement = _fraction(
            [r.baseline.success == r.base_fp32.success for r in rows if r.probe.kind in PRESERVED_KINDS]
        )

    results: list[GateResult] = []
    if gates.survival is not None:
        value = survival["all"]
        failing = [_label(r) for r in rows if not r.survived]
        results.append(
            GateResult(
                "survival",
                value,
                gates.survival,
                value is not None and value >= gates.survival,
                f"verdicts equal to fp32: {value:.3f} (need ≥ {gates.survival})",
                failing,
            )
        )
    if gates.specificity_drop is not None and baseline is not None:
        b, a = rates["baseline"]["neighborhood"], rates["artifact"]["neighborhood"]
        if b is not None and a is not None:
            drop = b - a
            failing = [
                _label(r)
                for r in rows
                if r.probe.kind == "neighborhood" and r.baseline.success and not r.artifact.success
            ]
            results.append(
                GateResult(
                    "specificity_drop",
                    drop,
                    gates.specificity_drop,
                    drop <= gates.specificity_drop,
                    f"neighbourhood {a:.1f} vs paired baseline {b:.1f}: drop {drop:.1f} points "
                    f"(allowed ≤ {gates.specificity_drop})",
                    failing,
                )
            )
    if gates.efficacy is not None:
        value = rates["artifact"]["edit"]
        failing = [_label(r) for r in rows if r.probe.kind == "edit" and not r.artifact.success]
        results.append(
            GateResult(
                "efficacy",
                value,
                gates.efficacy,
                value is not None and value >= gates.efficacy,
                f"efficacy in the artifact {value:.1f} (need ≥ {gates.efficacy})",
                failing,
            )
        )
    if gates.relative_margin is not None and agreement is not None and survival["edited"] is not None:
        need = 100 * agreement - gates.relative_margin
        value = 100 * survival["edited"]
        failing = [_label(r) for r in rows if r.probe.kind in EDITED_KINDS and not r.survived]
        results.append(
            GateResult(
                "relative_survival",
                value,
                need,
                value >= need,
                f"edited survival {value:.1f} vs baseline agreement {100 * agreement:.1f} − "
                f"{gates.relative_margin}",
                failing,
            )
        )
    return Verification(rows, rates, survival, agreement, results)
