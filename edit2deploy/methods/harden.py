"""Quantization-aware hardening of one batch (`edit --harden-for Q4_K_M,onnx:int4`).

After a batch is solved, its fact suite is scored on the model with each target's quantization simulated
(`edit2deploy.quantsim`). For every request whose edit or paraphrase verdict is predicted to flip (or to survive by less than `risk`
nats), δ is
optimised again *in the simulated model* (starting from the edited, quantized hidden state) until the new
target beats the true answer by ≥ `margin` nats per token in every context; that extra δ is added to the
request's target value and the whole batch is solved again from the pre-batch weights. Up to `rounds` times.

Specificity guard: if a round costs the batch's neighbourhood prompts more than `specificity_limit` points (fp32
and every simulated target), that round is undone and hardening stops: the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from ..probes import EDITED_KINDS, PROBE_KINDS, Probe, ProbeResult, probes_for, run_probes
from ..quantsim import Prediction, Simulation, predict
from ..requests import EditRequest
from ..scoring import TorchScorer
from .values import ValueResult, optimise_values


@dataclass(frozen=True)
class HardenConfig:
    margin: float = 1.0  # nats per token the new target must beat the true answer by, in the simulated model
    # Also harden facts predicted to survive by less than this (nats per token): the simulation leaves some of
    # the runtime's arithmetic out (measured |margin error| on SmolLM2: mean 0.12-0.19, max ~1), so a fact that
    # barely survives in it may still flip in the runtime.
    risk: float = 0.5
    rounds: int = 3
    specificity_limit: float = 5.0  # most neighbourhood points (of this batch) a round may cost

    def to_json(self) -> dict:
        return asdict(self)


def _rate(results: Sequence[ProbeResult], kind: str) -> float | None:
    sel = [r.success for r in results if r.probe.kind == kind]
    return 100.0 * sum(sel) / len(sel) if sel else None


@dataclass
class _Eval:
    fp32: list[ProbeResult]
    predictions: list[Prediction]

    def flips(self, ids: Sequence[str], risk: float = 0.0) -> dict[int, tuple[float, int]]:
        """Request index -> (worst predicted margin, simulation index) over its edit/paraphrase probes that are
        predicted to flip, or that win in fp32 and are predicted to win by less than `risk`."""
        index = {rid: i for i, rid in enumerate(ids)}
        worst: dict[int, tuple[float, int]] = {}
        for si, pred in enumerate(self.predictions):
            at_risk = [
                r
                for r in pred.rows
                if r.probe.kind in EDITED_KINDS
                and (not r.survives or (r.fp32.success and r.predicted.margin < risk))
            ]
            for row in at_risk:
                ri = index[row.probe.request_id]
                m = row.predicted.margin
                if ri not in worst or m < worst[ri][0]:
                    worst[ri] = (m, si)
        return worst

    def summary(self) -> dict:
        out = {"fp32": {k: _rate(self.fp32, k) for k in PROBE_KINDS}}
        for p in self.predictions:
            out[p.target] = {
                "edited_survival": p.survival(EDITED_KINDS),
                **{k: p.rate(k) for k in PROBE_KINDS},
            }
        return out

    def neighbourhood_drop(self, before: _Eval) -> float:
        """The largest neighbourhood loss (points) vs `before`, over fp32 and every simulated target."""
        drops = []
        a, b = _rate(self.fp32, "neighborhood"), _rate(before.fp32, "neighborhood")
        if a is not None and b is not None:
            drops.append(b - a)
        for p, q in zip(self.predictions, before.predictions):
            a, b = p.rate("neighborhood"), q.rate("neighborhood")
            if a is not None and b is not None:
                drops.append(b - a)
        return max(drops, default=0.0)


@dataclass
class Hardener:
    """Hardens each batch against the quantization of `simulations` (one per target)."""

    simulations: list[Simulation]
    cfg: HardenConfig = field(default_factory=HardenConfig)
    quiet: bool = False

    def _evaluate(self, editor, probes: list[Probe]) -> _Eval:
        lm = editor.lm
        fp32 = run_probes(TorchScorer(lm.model, lm.tokenizer), probes, lm.tokenizer.decode)
        return _Eval(fp32, [predict(sim, probes, fp32) for sim in self.simulations])

    def run(
        self,
        editor,
        requests: Sequence[EditRequest],
        values: ValueResult,
        originals: dict[int, torch.Tensor],
        deltas: dict[int, torch.Tensor],
        keys: dict[int, torch.Tensor],
        timings: dict[str, float],
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict]:
        probes = probes_for(requests)
        ids = [r.id for r in requests]
        ev = self._evaluate(editor, probes)
        first = ev
        record: dict = {
            "config": self.cfg.to_json(),
            "targets": [s.target for s in self.simulations],
            "before": ev.summary(),
            "rounds": [],
        }
        delta = values.delta.clone()  # (d, n) float64
        hp = replace(editor.cfg.values, margin=self.cfg.margin, mpes=True)
        for k in range(self.cfg.rounds):
            flips = ev.flips(ids, self.cfg.risk)
            if not flips:
                break
            by_sim: dict[int, list[int]] = {}
            for ri, (_, si) in flips.items():
                by_sim.setdefault(si, []).append(ri)
            extra_steps = {}
            for si, idx in sorted(by_sim.items()):
                sim = self.simulations[si]
                with sim.applied():
                    vr = optimise_values(
                        editor.lm,
                        [requests[i] for i in idx],
                        editor.templates,
                        editor.layers[-1],
                        hp,
                        quiet=True,
                    )
                for j, ri in enumerate(idx):
                    delta[:, ri] += vr.delta[:, j].to(delta.dtype)
                    extra_steps[ids[ri]] = vr.steps[j]
            saved = (editor.weights(), deltas, keys)
            editor.restore(originals)
            deltas, keys = editor.solve(requests, delta, timings, originals)
            new = self._evaluate(editor, probes)
            drop = new.neighbourhood_drop(first)
            entry = {
                "round": k + 1,
                "hardened": {
                    ids[ri]: {
                        "target": self.simulations[si].target,
                        "margin_before": None if not math.isfinite(m) else round(m, 4),
                        "steps": extra_steps[ids[ri]],
                    }
                    for ri, (m, si) in sorted(flips.items())
                },
                "after": new.summary(),
                "neighbourhood_drop": round(drop, 2),
            }
            if drop > self.cfg.specificity_limit:
                entry["undone"] = (
                    f"neighbourhood fell {drop:.1f} points (limit {self.cfg.specificity_limit}); "
                    "this round was undone"
                )
                editor.restore(saved[0])
                deltas, keys = saved[1], saved[2]
                record["rounds"].append(entry)
                break
            record["rounds"].append(entry)
            ev = new
        record["after"] = ev.summary()
        record["remaining_flips"] = sorted(ids[ri] for ri in ev.flips(ids))
        return deltas, keys, record
