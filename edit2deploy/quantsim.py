"""Quantization simulation: a deployment scheme's weight rounding, applied to the model in torch.

A *scheme* (one per target, e.g. `gguf:Q4_K_M`, `onnx:int4`, `bnb:nf4`) says, for every weight of the model,
how the deployed artifact stores it: its stored type and a `fake` function (quantize, then dequantize, with the
scheme's exact block math) that turns the full-precision tensor into the values the runtime multiplies with.
Schemes are built by the formats (`edit2deploy.exporters.SIMULATORS`); this module never imports a format.

`Simulation` swaps the simulated weights into a loaded model and restores the originals bit for bit
afterwards, recomputing only the tensors that changed since the last use (in a hardening loop only the edited
tensors change). `predict` scores the fact suite on the simulated model and compares every verdict with the
full-precision one: the predicted survival of each fact before anything is exported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .gates import preserved_probes
from .models import LoadedModel
from .probes import EDITED_KINDS, PRESERVED_KINDS, RATE_KINDS, Probe, ProbeResult, probes_for, run_probes
from .requests import EditRequest
from .scoring import Scorer, TorchScorer

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TensorQuant:
    """How a scheme stores one weight: its stored type and quantize→dequantize (None: kept as is)."""

    stored: str  # "Q4_K", "int4/b32", "nf4", "float32", ...
    fake: FakeQuant | None = None
    # What the runtime does to this layer's *input* before multiplying (e.g. llama.cpp quantizes activations to
    # Q8_0 / Q8_K blocks for quantized weights; onnxruntime's int8 compute at accuracy level 4): None = nothing.
    act: FakeQuant | None = None


@runtime_checkable
class QuantScheme(Protocol):
    """One deployment target's weight rounding, tensor by tensor."""

    target: str  # "gguf:Q4_K_M"

    def plan(self) -> Mapping[str, TensorQuant]:
        """Hugging Face parameter name -> how it is stored. A tied model may list `lm_head.weight` apart from
        the embedding when the runtime stores the two differently."""
        ...


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    """Cheap content key (a full sum and a strided sample sum, float64): changes whenever an edit lands."""
    flat = t.detach().reshape(-1)
    return float(flat.double().sum()), float(flat[::997].double().pow(2).sum())


def _tied_head(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


@dataclass
class Simulation:
    """A scheme's simulated weights for one loaded model; `applied()` swaps them in and back out."""

    lm: LoadedModel
    scheme: QuantScheme
    _plan: dict[str, TensorQuant] = field(init=False)
    _cache: dict[str, tuple[tuple[float, float], torch.Tensor]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._plan = dict(self.scheme.plan())
        params = dict(self.lm.model.named_parameters(remove_duplicate=False))
        unknown = [n for n in self._plan if n not in params]
        if unknown:
            raise ValueError(
                f"{self.scheme.target}: plan names tensors the model does not have: {unknown[:5]}"
            )

    @property
    def target(self) -> str:
        return self.scheme.target

    def stored_types(self) -> dict[str, str]:
        return {n: q.stored for n, q in self._plan.items()}

    def _simulated(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # Keyed by a content fingerprint: in a hardening loop only the edited tensors change between uses.
        version = _fingerprint(weight)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == version:
            return hit[1]
        fake = self._plan[name].fake
        with torch.no_grad():
            sim = fake(weight.detach().float().cpu()).to(weight.dtype).to(weight.device)
        if sim.shape != weight.shape:
            raise RuntimeError(
                f"{self.target}: simulated '{name}' has shape {tuple(sim.shape)}, not {tuple(weight.shape)}"
            )
        self._cache[name] = (version, sim)
        return sim

    @contextlib.contextmanager
    def applied(self) -> Iterator[LoadedModel]:
        """The model with every planned weight replaced by its simulated value; restored exactly on exit."""
        model = self.lm.model
        params = dict(model.named_parameters(remove_duplicate=False))
        head = model.get_output_embeddings()
        untie = (
            _tied_head(model)
            and "lm_head.weight" in self._plan
            and self._plan["lm_head.weight"].stored
            != getattr(self._plan.get(_embedding_name(model)), "stored", None)
        )
        saved: dict[str, torch.Tensor] = {}
        tied_param = head.weight if untie else None
        hooks = [
            module.register_forward_pre_hook(_input_hook(act))
            for module, act in self._activation_modules(model, head)
        ]
        try:
            with torch.no_grad():
                if untie:
                    # The runtime stores head and embedding apart: give the head its own tensor for the duration.
                    shared = tied_param
                    sim = self._simulated("lm_head.weight", shared)
                    head.weight = torch.nn.Parameter(sim.clone(), requires_grad=False)
                for name, q in self._plan.items():
                    if q.fake is None or (untie and name == "lm_head.weight"):
                        continue
                    p = params[name]
                    if any(p is params[s] for s in saved):  # a tied alias already swapped
                        continue
                    sim = self._simulated(name, p)
                    saved[name] = p.data
                    p.data = sim
            yield self.lm
        finally:
            for h in hooks:
                h.remove()
            with torch.no_grad():
                for name, data in saved.items():
                    params[name].data = data
                if untie:
                    head.weight = tied_param

    def _activation_modules(self, model: torch.nn.Module, head: torch.nn.Module | None):
        """(module, input fake-quant) for every planned weight whose runtime quantizes the layer's input."""
        out = []
        for name, q in self._plan.items():
            if q.act is None or not name.endswith(".weight"):
                continue
            module = model.get_submodule(name.removesuffix(".weight"))
            if isinstance(module, torch.nn.Embedding):
                # a table lookup has no input to quantize; a tied head multiplies with the same stored tensor
                if head is not None and _tied_head(model) and "lm_head.weight" not in self._plan:
                    out.append((head, q.act))
                continue
            out.append((module, q.act))
        return out


def _input_hook(act: FakeQuant):
    def hook(_module, args):
        if not args or not torch.is_tensor(args[0]):
            return None
        x = args[0]
        return (
            act(x.detach().float()).to(x.dtype) + (x - x.detach()),
            *args[1:],
        )  # straight-through gradient

    return hook


def _embedding_name(model: torch.nn.Module) -> str:
    emb = model.get_input_embeddings()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is emb.weight:
            return name
    return "model.embed_tokens.weight"


# ---------------------------------------------------------------------------------------------- prediction


@dataclass
class PredictedRow:
    probe: Probe
    fp32: ProbeResult
    predicted: ProbeResult

    @property
    def survives(self) -> bool:
        return self.fp32.success == self.predicted.success

    def to_json(self) -> dict:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "kind": self.probe.kind,
            "id": self.probe.request_id,
            "prompt": self.probe.prompt,
            "expected": self.probe.expected,
            "other": self.probe.other,
            "margin_fp32": finite(self.fp32.margin),
            "margin_predicted": finite(self.predicted.margin),
            "success_fp32": self.fp32.success,
            "success_predicted": self.predicted.success,
            "survives": self.survives,
        }


@dataclass
class Prediction:
    """Predicted verdicts of the fact suite under one scheme."""

    target: str
    rows: list[PredictedRow]
    stored_types: dict[str, str]

    def survival(self, kinds: Sequence[str] | None = None) -> float | None:
        sel = [r.survives for r in self.rows if kinds is None or r.probe.kind in kinds]
        return sum(sel) / len(sel) if sel else None

    def rate(self, kind: str, which: str = "predicted") -> float | None:
        sel = [getattr(r, which).success for r in self.rows if r.probe.kind == kind]
        return 100.0 * sum(sel) / len(sel) if sel else None

    def flipped(self, kinds: Sequence[str] = EDITED_KINDS) -> list[PredictedRow]:
        return [r for r in self.rows if r.probe.kind in kinds and not r.survives]

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "survival": {
                "all": self.survival(),
                "edited": self.survival(EDITED_KINDS),
                "preserved": self.survival(PRESERVED_KINDS),
            },
            "rates": {which: {k: self.rate(k, which) for k in RATE_KINDS} for which in ("fp32", "predicted")},
            "stored_types": self.stored_types,
            "facts": [r.to_json() for r in self.rows],
        }


def suite(requests: Sequence[EditRequest], preserved: Sequence[EditRequest] = ()) -> list[Probe]:
    """The verification fact suite (as `verify` builds it)."""
    return probes_for(requests) + preserved_probes(preserved)


def predict(
    sim: Simulation,
    probes: Sequence[Probe],
    reference: Sequence[ProbeResult] | None = None,
    batch_size: int = 32,
) -> Prediction:
    """Score `probes` on the simulated model; `reference` = the fp32 results (scored here when not given)."""
    lm = sim.lm
    scorer: Scorer = TorchScorer(lm.model, lm.tokenizer, batch_size=batch_size)
    decode = lm.tokenizer.decode
    if reference is None:
        reference = run_probes(scorer, probes, decode)
    with sim.applied():
        predicted = run_probes(scorer, probes, decode)
    rows = [PredictedRow(p, r, q) for p, r, q in zip(probes, reference, predicted)]
    return Prediction(sim.target, rows, sim.stored_types())
