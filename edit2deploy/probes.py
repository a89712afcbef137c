"""Fact probes and their metrics, written once against the `Scorer` protocol.

A probe asks whether `expected` beats `other` after a prompt, comparing mean per-token
log-probs (as ROME/MEMIT's CounterFact evaluation does). Edit and paraphrase probes expect the
new target over the true answer; neighbourhood probes expect the preserved answer over the new target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from .requests import EditRequest
from .scoring import Scorer

PROBE_KINDS = ("edit", "paraphrase", "neighborhood")  # the probes an edit request yields
EDITED_KINDS = ("edit", "paraphrase")  # must show the new answer
PRESERVED_KINDS = ("neighborhood", "preserved")  # must keep their answer
RATE_KINDS = EDITED_KINDS + PRESERVED_KINDS  # every kind a rate is reported for


def continuation(answer: str) -> str:
    """Answers are stored without a leading space; as a continuation they follow one."""
    return answer if answer.startswith(" ") else " " + answer


@dataclass(frozen=True)
class Probe:
    request_id: str
    kind: str  # one of PROBE_KINDS
    prompt: str
    expected: str
    other: str | None  # None: success means greedy decoding produces `expected`


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    lp_expected: float  # mean per-token log-prob
    lp_other: float | None
    greedy_expected: bool  # greedy decoding reproduces every token of `expected`
    top1_id: int  # argmax right after the prompt
    top1: str

    @property
    def margin(self) -> float:
        """lp(expected) − lp(other) in nats per token (no `other`: +/-inf by greedy match)."""
        if self.lp_other is None:
            return math.inf if self.greedy_expected else -math.inf
        return self.lp_expected - self.lp_other

    @property
    def success(self) -> bool:
        return self.margin > 0

    def to_json(self) -> dict:
        d = asdict(self.probe)
        d.update(
            lp_expected=self.lp_expected,
            lp_other=self.lp_other,
            p_expected=math.exp(self.lp_expected),
            p_other=None if self.lp_other is None else math.exp(self.lp_other),
            margin=None if self.lp_other is None else self.margin,
            success=self.success,
            top1=self.top1,
            top1_id=self.top1_id,
        )
        return d


def probes_for(requests: Iterable[EditRequest], kinds: Sequence[str] = PROBE_KINDS) -> list[Probe]:
    out: list[Probe] = []
    for r in requests:
        if "edit" in kinds:
            out.append(Probe(r.id, "edit", r.text, r.target_new, r.target_true))
        if "paraphrase" in kinds:
            out.extend(Probe(r.id, "paraphrase", p, r.target_new, r.target_true) for p in r.paraphrases)
        if "neighborhood" in kinds:
            out.extend(Probe(r.id, "neighborhood", n.prompt, n.answer, r.target_new) for n in r.neighborhood)
    return out


def run_probes(scorer: Scorer, probes: Sequence[Probe], decode=None) -> list[ProbeResult]:
    """Score every probe in one batched call to the scorer."""
    pairs: list[tuple[str, str]] = []
    for p in probes:
        pairs.append((p.prompt, continuation(p.expected)))
        if p.other is not None:
            pairs.append((p.prompt, continuation(p.other)))
    scored = iter(scorer.score(pairs))
    results = []
    for p in probes:
        exp_s = next(scored)
        oth_s = next(scored) if p.other is not None else None
        top1_id = exp_s.greedy_ids[0]
        results.append(
            ProbeResult(
                probe=p,
                lp_expected=exp_s.mean,
                lp_other=None if oth_s is None else oth_s.mean,
                greedy_expected=exp_s.greedy_matches,
                top1_id=top1_id,
                top1=decode([top1_id]) if decode else str(top1_id),
            )
        )
    return results


def rates(results: Sequence[ProbeResult]) -> dict[str, float | None]:
    """Success rate (0-100) per probe kind: efficacy (edit), paraphrase, neighborhood."""
    out: dict[str, float | None] = {}
    for kind in PROBE_KINDS:
        sel = [r.success for r in results if r.probe.kind == kind]
        out[kind] = 100.0 * sum(sel) / len(sel) if sel else None
    return out
