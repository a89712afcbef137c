"""Applying a batch of edits: keys → target values → per-layer spread and solve (docs/method.md, steps 1-5).

A batch applies completely or not at all: if any layer's solve is not finite, every tensor the
batch touched is restored before the error propagates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from ..arch import Architecture
from ..errors import Edit2DeployError, NonFiniteUpdateError, UsageError
from ..memory import release_freed
from ..models import LoadedModel
from ..requests import EditRequest
from .chat import chat_contexts_wanted, chat_kinds, chat_templates
from .keys import KeyPasses, context_templates
from .neighbours import neighbour_requests
from .preserved import second_moment
from .retry import resolve_failed
from .solves import (
    alphaedit_kernel_update,
    alphaedit_null_update,
    complement_to_basis,
    encore_update,
    memit_update,
    mixed_covariance,
    null_space_basis,
    null_space_split,
)
from .values import ValueHParams, ValueResult, shared_values

if TYPE_CHECKING:
    from .harden import Hardener


@dataclass(frozen=True)
class EditConfig:
    """Hyperparameters of an edit run (defaults and their reasons: docs/method.md; per-architecture layers in arch.py)."""

    method: str = "default"
    layers: tuple[int, ...] = ()  # empty: the architecture's default
    lambda_p: float = 15_000.0  # weight of the preserved-key covariance C
    lambda_n: float = 15.0  # ENCORE's Frobenius-norm weight
    alpha: float = 10.0  # AlphaEdit's α (a Frobenius penalty on the projected update)
    # Null-space threshold on the normalised covariance (eigenvalue / λ_max). The original spec's 2e-2 is meant to keep ~70%
    # of the directions; on SmolLM2's flatter spectrum it keeps 77-91% (and 32-47% of the preserved keys' energy),
    # 1e-2 keeps 52-78% — and gave +4 NS at equal ES/PS (benchmarks/RESULTS.md, "Null-space threshold").
    tau: float = 1e-2
    tau_relative: bool = True  # False: τ is an absolute eigenvalue threshold, as in AlphaEdit's released code
    # Fields left None are the method's own choice (`MethodSpec.defaults`, else `UNCHOSEN`), filled in by
    # `resolve_config` and recorded so.
    # Weight of C inside the null space (λ_∅ C P in the AlphaEdit solve): the preserved keys' energy that the
    # threshold lets through is penalised as in MEMIT. 0: AlphaEdit as published.
    lambda_null: float | None = None
    # With λ_∅ > 0: penalise the whole drift W − W0 on the preserved keys, not only this batch's ΔW, so each
    # batch also pulls back what earlier batches moved there (the solve's D term). False: per batch, as above.
    null_drift: bool = False
    # Re-solve rounds per batch for requests whose edit prompt still fails after the solve (methods/retry.py):
    # their δ is optimised further on the edited model and the batch is solved again. 0: one solve, as published.
    retry_rounds: int | None = None
    # `retry_chat`: with retry rounds, an edit also counts as failed while the edited model's greedy chat reply to
    # its prompt (its own template, fp32, and each hardening target's simulated quantization) does not give the new
    # answer (generation.py's verdict).
    retry_chat: bool | None = None
    # `retry_completion`: the same for the greedy plain-text continuation of its prompt.
    retry_completion: bool | None = None
    # Neighbour keys (methods/neighbours.py): each request's prompt asked about `neighbour_names` other names
    # from the statistics corpus, held at their outputs with this weight per request (‖ΔW Kn‖² in the solve).
    # `neighbour_kept`: they also join the previous keys, so later batches hold them too. 0: as published.
    neighbour_weight: float = 0.0
    neighbour_names: int = 10
    neighbour_kept: bool = False
    # `neighbour_null`: the neighbour keys shape AlphaEdit's null space instead (per batch, from C plus their
    # covariance scaled to C's trace times `neighbour_weight`); the ‖ΔW Kn‖² term is then not added.
    neighbour_null: bool = False
    # Preserved facts (methods/preserved.py, `edit --preserved`): their keys' covariance joins C at this weight
    # (times C's trace) when the null space is built, so the update leaves those facts alone.
    preserve_weight: float = 0.1
    # The statistics corpus's names (`stats.corpus_names`) join the preserved facts when the default method's null
    # space is built, less those in the texts being edited (not with `neighbour_null`, which reshapes it per batch;
    # alphaedit stays as published): subjects asked about in fact prompts use the null space about twice as much as
    # running text, so without them an edit also moves other names (RESULTS.md, stop 25).
    preserve_names: bool = True
    # Chat contexts (methods/chat.py): "auto" = on when the model has a chat template; resolved to "on"/"off"
    # in the recorded config. `chat_keys`: "separate" gives each fact a second key column (its chat contexts'
    # mean key, solved toward the same residual), "shared" mixes them into the one key. `chat_kinds`: which chat
    # contexts, "restated" (the assistant repeats the prompt, then answers), "reply" (the answer opens the reply)
    # or "both"; alone, the reply context's δ moves other names with the subject (RESULTS.md, 1.6).
    chat_contexts: str = "auto"
    chat_keys: str = "separate"
    chat_kinds: str | None = None
    values: ValueHParams = field(default_factory=ValueHParams)

    def to_json(self) -> dict:
        return asdict(self)


# What a method that makes no choice of its own gets for each None field of `EditConfig` (as published: no λ_∅, one
# solve, the restated chat context). Also the type of each such field, for settings' checks.
UNCHOSEN: dict[str, Any] = {
    "lambda_null": 0.0,
    "retry_rounds": 0,
    "retry_chat": False,
    "retry_completion": False,
    "chat_kinds": "restated",
}

# The default method's choices (benchmarks/RESULTS.md, 1.11): with both chat contexts, edits that the chat reply and
# the plain continuation show, in full precision and in each hardening target's simulated quantization (`retry_chat`,
# `retry_completion`, up to 4 re-solves), while λ_∅ 15000 holds perplexity and the neighbourhood.
DEFAULT_METHOD_CHOICES: dict[str, Any] = {
    "lambda_null": 15_000.0,
    "retry_rounds": 4,
    "retry_chat": True,
    "retry_completion": True,
    "chat_kinds": "both",
}


def no_previous_keys(d_in: int) -> torch.Tensor:
    """Σ Kp Kpᵀ before any batch: a d_in × d_in zero that stores one element (stride 0), so no d_in² matrix of
    zeros is held."""
    return torch.zeros((), dtype=torch.float64).expand(d_in, d_in)


def sum_of_products(keys: Iterable[torch.Tensor], size: int) -> torch.Tensor:
    """Σ K Kᵀ (size × size, float64) over `keys`, summed in place."""
    out = torch.zeros(size, size, dtype=torch.float64)
    for K in keys:
        out.addmm_(K, K.T)
    return out


@dataclass
class LayerState:
    """Method state of one edited layer: the earlier batches' keys and the null space's basis (persisted with the
    patched model: the keys in each batch's record, the basis as method state).

    The null space is held as U (P = U Uᵀ) or, when it is the larger part of the d_in directions, as its
    complement V (`complement`, P = I − V Vᵀ): the default solve (`solves.alphaedit_kernel_update`) applies P
    through either. Products of the keys are formed when a solve first reads them, then kept current by
    `add_keys`: ENCORE's Σ Kp Kpᵀ (d_in × d_in), λ_∅'s solve's Uᵀ Kp Kpᵀ U (r × r). A run of one batch forms
    neither."""

    d_in: int
    # earlier batches' keys, each (d_in, n) float64
    previous: list[torch.Tensor] = field(default_factory=list)
    null_basis: torch.Tensor | None = None  # AlphaEdit: U (P = U Uᵀ), or V with `complement`
    complement: bool = False  # null_basis is V, the complement's basis: P = I − V Vᵀ

    _KpKpT: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _previous_keys: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _null_previous: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _null_covariance: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _null_cross: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def basis(self) -> torch.Tensor:
        """U itself (λ_∅'s solve works in its coordinates); formed from V, once, where V is held."""
        if self.null_basis is None:
            raise ValueError("this layer has no null-space basis")
        if self.complement:
            self.null_basis, self.complement = complement_to_basis(self.null_basis), False
        return self.null_basis.to(torch.float64)

    def null_dim(self) -> int:
        """r: how many directions the null space holds."""
        if self.null_basis is None:
            raise ValueError("this layer has no null-space basis")
        cols = self.null_basis.shape[1]
        return self.d_in - cols if self.complement else cols

    def KpKpT(self) -> torch.Tensor:
        """Σ Kp Kpᵀ over the earlier batches (`no_previous_keys` before any)."""
        if not self.previous:
            return no_previous_keys(self.d_in)
        if self._KpKpT is None:
            self._KpKpT = sum_of_products(self.previous, self.d_in)
        return self._KpKpT

    def previous_keys(self) -> torch.Tensor | None:
        """The earlier batches' keys as one (d_in, m) matrix, or, once m exceeds d_in, a (d_in, d_in) factor F
        with F Fᵀ = Σ Kp Kpᵀ (all the kernel solve reads of them); None before any."""
        if not self.previous:
            return None
        if self._previous_keys is None:
            self._previous_keys = _compressed(torch.cat(self.previous, dim=1))
        return self._previous_keys

    def null_previous(self) -> torch.Tensor | None:
        """Uᵀ Kp Kpᵀ U (r × r) over the earlier batches; None before any."""
        if not self.previous:
            return None
        if self._null_previous is None:
            U = self.basis()
            self._null_previous = sum_of_products((U.T @ K for K in self.previous), U.shape[1])
        return self._null_previous

    def null_covariance(self, C: torch.Tensor) -> torch.Tensor:
        """Uᵀ C U for the λ_∅ term, formed once: an editor's C is fixed for the run, so later batches reuse it."""
        if self._null_covariance is None:
            self._null_covariance = self.null_cross(C) @ self.basis()
        return self._null_covariance

    def null_cross(self, C: torch.Tensor) -> torch.Tensor:
        """Uᵀ C (r × d_in), for the drift term and Uᵀ C U; formed once."""
        if self._null_cross is None:
            self._null_cross = self.basis().T @ C.to(torch.float64)
        return self._null_cross

    def add_keys(self, K: torch.Tensor) -> None:
        """An applied batch's keys join the earlier batches' (and the products formed so far)."""
        K = K.to(torch.float64)
        self.previous.append(K)
        if self._KpKpT is not None:
            self._KpKpT.addmm_(K, K.T)
        if self._previous_keys is not None:
            self._previous_keys = _compressed(torch.cat([self._previous_keys, K], dim=1))
        if self._null_previous is not None:
            UK = self.basis().T @ K
            self._null_previous.addmm_(UK, UK.T)


def _compressed(F: torch.Tensor) -> torch.Tensor:
    """F itself, or, with more columns than rows, the d × d factor Rᵀ of Fᵀ = Q R: Rᵀ R = F Fᵀ."""
    if F.shape[1] <= F.shape[0]:
        return F
    return torch.linalg.qr(F.T, mode="r")[1].T.contiguous()


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how a method solves for ΔW and which state it uses."""

    name: str
    solve: Callable[..., torch.Tensor]  # (K, R, C, state, cfg, drift, Kn) -> ΔW (d_out, d_in) float64
    mpes: bool
    uses_projector: bool = False
    # the statistics corpus's names join the preserved facts of its null space (`EditConfig.preserve_names`)
    preserves_names: bool = False
    description: str = ""
    # its values for `EditConfig` fields left None (the others come from `UNCHOSEN`)
    defaults: Mapping[str, Any] = field(default_factory=dict)


def _memit(K, R, C, state: LayerState, cfg: EditConfig, drift=None, Kn=None) -> torch.Tensor:
    return memit_update(K, R, C, cfg.lambda_p, Kn)


def _encore(K, R, C, state: LayerState, cfg: EditConfig, drift=None, Kn=None) -> torch.Tensor:
    return encore_update(K, R, C, state.KpKpT(), cfg.lambda_p, cfg.lambda_n, Kn)


def _alphaedit(K, R, C, state: LayerState, cfg: EditConfig, drift=None, Kn=None) -> torch.Tensor:
    # `alphaedit_update`'s ΔW with no d_in² projector or system: in the keys' coordinates (m × m), or with λ_∅ (a
    # full-rank term) in the null space's (r × r)
    if not cfg.lambda_null:
        return alphaedit_kernel_update(
            K, R, state.null_basis, state.complement, cfg.alpha, state.previous_keys(), Kn
        )
    drifted = cfg.lambda_null and cfg.null_drift and drift is not None
    return alphaedit_null_update(
        K,
        R,
        state.basis(),
        state.null_previous(),
        cfg.alpha,
        cfg.lambda_null,
        U_C_U=state.null_covariance(C) if cfg.lambda_null else None,
        U_C=state.null_cross(C) if drifted else None,
        D=drift if drifted else None,
        Kn=Kn,
    )


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("memit", _memit, mpes=False, description="MEMIT: R Kᵀ (λ_p C + K Kᵀ)⁻¹"),
        MethodSpec(
            "alphaedit",
            _alphaedit,
            mpes=False,
            uses_projector=True,
            description="AlphaEdit: null-space projected solve with previous keys",
        ),
        MethodSpec(
            "encore", _encore, mpes=True, description="ENCORE: MPES + Frobenius-norm term + previous keys"
        ),
        MethodSpec(
            "default",
            _alphaedit,
            mpes=True,
            uses_projector=True,
            preserves_names=True,
            description="AlphaEdit's null-space solve + ENCORE's MPES (α acts as the norm weight)",
            defaults=DEFAULT_METHOD_CHOICES,
        ),
    )
}


@dataclass
class BatchReport:
    """What one applied batch did (goes into the ledger)."""

    deltas: dict[int, torch.Tensor]  # layer -> ΔW as applied (stored layout, float32)
    keys: dict[int, torch.Tensor]  # layer -> K (d_in, n) float64
    steps: list[int]
    converged: list[bool]
    timings: dict[str, float]
    hardening: dict | None = None  # what quantization-aware hardening did (ledger record)
    retry: dict | None = None  # which failed edits were re-solved (ledger record)


def check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The edited layers, sorted; a usage error for any outside the model."""
    bad = [li for li in layers if not 0 <= li < num_layers]
    if bad:
        raise UsageError(f"--layers: {bad} out of range (model has {num_layers} layers: 0-{num_layers - 1})")
    return tuple(sorted(layers))


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UsageError(f"unknown method '{name}' (expected one of: {', '.join(METHODS)})")
    return METHODS[name]


def resolve_config(cfg: EditConfig, arch: Architecture, n_layers: int, has_chat_template: bool) -> EditConfig:
    """`cfg` as an edit applies and records it: the architecture's default layers, the method's choices for the
    fields left None (its MPES default among them) and whether chat contexts are used filled in. A later run
    compares its own resolved config with the recorded one to reuse an edit."""
    spec = method_spec(cfg.method)
    chosen = {
        name: spec.defaults.get(name, unchosen)
        for name, unchosen in UNCHOSEN.items()
        if getattr(cfg, name) is None
    }
    cfg = replace(cfg, **chosen)
    layers = check_layers(cfg.layers or arch.layers_for(n_layers), n_layers)
    mpes = spec.mpes if cfg.values.mpes is None else cfg.values.mpes
    if cfg.chat_contexts == "on" and not has_chat_template:
        raise UsageError(
            "chat_contexts = on needs a chat template, and this model has none (use auto or off)"
        )
    chat = "on" if chat_contexts_wanted(cfg.chat_contexts, has_chat_template) else "off"
    return replace(cfg, layers=layers, chat_contexts=chat, values=replace(cfg.values, mpes=mpes))


class Editor:
    """Applies batches of requests to a loaded model, keeping method state between batches.

    `stats` (C per layer) is taken over: with a method whose solves read no C once the null space is built (the
    default method, AlphaEdit), each layer's C is removed from it after its basis, so one is held at a time."""

    def __init__(
        self,
        lm: LoadedModel,
        cfg: EditConfig,
        stats: MutableMapping[int, torch.Tensor],
        prefixes: Sequence[str],
        state: dict[int, LayerState] | None = None,
        quiet: bool = False,
        base: dict[int, torch.Tensor] | None = None,
        names: Sequence[str] = (),
        preserved: dict[int, torch.Tensor] | None = None,
    ):
        self.lm, self.cfg, self.quiet = lm, cfg, quiet
        self.names = list(names)  # other subjects for neighbour keys (stats.corpus_names)
        if cfg.neighbour_weight and cfg.neighbour_names and not self.names:
            raise UsageError("neighbour_weight > 0 needs names for the neighbour keys (stats.corpus_names)")
        self.spec = method_spec(cfg.method)
        if cfg.neighbour_null and not self.spec.uses_projector:
            raise UsageError(
                f"neighbour_null needs a method with a null space (alphaedit, default), not {cfg.method}"
            )
        if preserved and not self.spec.uses_projector:
            raise UsageError(
                f"preserved facts shape the null space of alphaedit and default; {cfg.method} has none"
            )
        if preserved and cfg.neighbour_null:
            raise UsageError(
                "neighbour_null and preserved facts both reshape the null space; use one of them"
            )
        has_template = bool(getattr(lm.tokenizer, "chat_template", None))
        self.cfg = resolve_config(cfg, lm.arch, lm.num_layers, has_chat_template=has_template)
        chat = (
            chat_templates(lm.tokenizer, chat_kinds(self.cfg.chat_kinds))
            if self.cfg.chat_contexts == "on"
            else []
        )
        if self.cfg.chat_contexts == "on" and not chat:
            raise UsageError("the model's chat template cannot hold a user message; use chat_contexts = off")
        self.layers = self.cfg.layers
        # C after the null space is built only where a solve reads it (MEMIT's and ENCORE's λ_p C, λ_∅, the
        # neighbours' per-batch null space): AlphaEdit's own solve does not, and it is d_in² per layer.
        uses_C = not self.spec.uses_projector or self.cfg.lambda_null or self.cfg.neighbour_null
        # (read per solve where `stats` reads the cache: `stats.CovarianceFiles`, so one C is held at a time)
        self.C = stats if uses_C else {}
        # Every context of z-optimisation: the text contexts, then (chat_contexts on) the chat contexts.
        self.text_templates = context_templates(prefixes)
        self.templates = self.text_templates + chat
        # Where the chat contexts' own key columns start (None: one key per fact)
        self.chat_from = (
            len(self.text_templates)
            if self.cfg.chat_contexts == "on" and self.cfg.chat_keys in ("separate", "own")
            else None
        )
        # `own`: the chat key column gets a target value of its own (δ from the chat contexts alone)
        self.own_chat_values = self.chat_from is not None and self.cfg.chat_keys == "own"
        self.state = state or {}
        for li in self.layers:
            if li not in self.state:
                self.state[li] = LayerState(d_in=lm.arch.to_out_in(lm.arch.get_weight(lm.model, li)).shape[1])
            # under torchrun only rank 0 solves (`solve`), so only it needs the basis (an eigendecomposition)
            if self.spec.uses_projector and self.state[li].null_basis is None and distributed.is_main():
                # preserved facts (`preserved`: their keys per layer) count once, here: the basis is kept with
                # the method state, so later batches and runs protect them too. Their covariance is formed per
                # layer, so one d_in² matrix of it exists at a time.
                release_freed()  # what the key passes before it freed: an eigendecomposition is the peak here
                kept = stats[li]
                if preserved and li in preserved:
                    kept = mixed_covariance(kept, second_moment(preserved[li]), cfg.preserve_weight)
                self.state[li].null_basis, self.state[li].complement = self._null_space(kept)
                del kept
            if not uses_C:
                # the editor takes `stats` over: where no solve reads C, each layer's leaves it once its basis is
                # built, so the caller's references go too and one C at a time is held past this point
                del stats[li]
        # W0 of each edited layer (stored layout) for `null_drift`: the caller's (an earlier run's originals),
        # else the weights as they are now (nothing drifted yet).
        self.base: dict[int, torch.Tensor] = {}
        if cfg.null_drift:
            base = base or {}
            self.base = {
                li: (base[li] if li in base else lm.arch.get_weight(lm.model, li)).detach().cpu().clone()
                for li in self.layers
            }

    def optimise(self, requests: Sequence[EditRequest]) -> ValueResult:
        """Target values z = h + δ for every request (in groups of `values.group`, default all at once). With
        `chat_keys = "own"`, δ is (d, 2n): the text contexts' δ, then the chat contexts' own δ."""
        if not self.own_chat_values:
            return self._optimise(requests, self.templates)
        text = self._optimise(requests, self.text_templates)
        chat = self._optimise(requests, self.templates[len(self.text_templates) :])
        return ValueResult(
            z=torch.cat([text.z, chat.z], dim=1),
            delta=torch.cat([text.delta, chat.delta], dim=1),
            steps=[a + b for a, b in zip(text.steps, chat.steps)],
            converged=[a and b for a, b in zip(text.converged, chat.converged)],
        )

    def _optimise(self, requests: Sequence[EditRequest], templates: Sequence[str]) -> ValueResult:
        """Under torchrun each rank optimises its share of the requests and all get every result."""
        cfg = self.cfg
        return shared_values(
            self.lm,
            requests,
            templates,
            self.layers[-1],
            cfg.values,
            quiet=self.quiet,
            group=cfg.values.group,
        )

    def weights(self) -> dict[int, torch.Tensor]:
        """A copy of every edited layer's current weight."""
        return {li: self.lm.arch.get_weight(self.lm.model, li).detach().clone() for li in self.layers}

    def restore(self, weights: dict[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for li, w in weights.items():
                self.lm.arch.get_weight(self.lm.model, li).copy_(w)

    def solve(
        self,
        requests: Sequence[EditRequest],
        delta: torch.Tensor,
        timings: dict[str, float],
        originals: dict[int, torch.Tensor] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Spread z = h + δ over the edited layers (docs/method.md, steps 3-4) and apply; all or nothing.
        Returns ΔW as applied (stored layout) and the keys, per layer.

        Under torchrun rank 0 alone solves and broadcasts ΔW and the keys (or its error); every other rank adds
        the same ΔW to the same weights, so all ranks hold identical weights and method state afterwards."""
        if distributed.world_size() == 1:
            return self._solve(requests, delta, timings, originals)
        result: object = None
        if distributed.is_main():
            try:
                result = self._solve(requests, delta, timings, originals)
            except Exception as exc:
                # the others must not wait for a ΔW that never comes: they raise it too (ours as it is, anything
                # else as a plain error, since it need not pickle)
                shared = exc if isinstance(exc, Edit2DeployError) else RuntimeError(f"rank 0 failed: {exc!r}")
                distributed.broadcast_object(shared)
                raise
        result = distributed.broadcast_object(result)
        if isinstance(result, BaseException):
            raise result
        deltas, keys = result  # type: ignore[misc]
        if not distributed.is_main():
            with torch.no_grad():
                for li, applied in deltas.items():
                    W = self.lm.arch.get_weight(self.lm.model, li)
                    W.add_(applied.to(W.device))
        return deltas, keys

    def _solve(
        self,
        requests: Sequence[EditRequest],
        delta: torch.Tensor,
        timings: dict[str, float],
        originals: dict[int, torch.Tensor] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        lm, arch, cfg = self.lm, self.lm.arch, self.cfg
        # the weights as they are now, to restore on failure (the caller's copy when it holds one)
        originals = originals if originals is not None else self.weights()
        deltas: dict[int, torch.Tensor] = {}
        keys: dict[int, torch.Tensor] = {}
        passes = KeyPasses(
            lm,
            requests,
            self.templates,
            self.layers[-1],
            onednn=cfg.values.onednn,
            chat_from=self.chat_from,
            chat_outputs=self.own_chat_values,
        )
        near = self._neighbour_passes(requests)
        try:
            for i, li in enumerate(self.layers):
                t = time.perf_counter()
                K, cur_z = passes(li)
                Kn = None
                if near is not None:  # each request's neighbours weigh `neighbour_weight` together
                    Kn = near[0](li)[0].cpu() * near[1]
                timings["keys"] = timings.get("keys", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                if i == 0:  # nothing of this batch applied yet: cur_z is h in full precision
                    z = cur_z + delta.to(cur_z.device)
                R = (z - cur_z) / (len(self.layers) - i)
                # With separate chat keys each fact has two key columns, both solved toward its residual
                # (with `own` chat values R already has a column per key).
                R_cols = R.repeat(1, K.shape[1] // R.shape[1])
                drift = None
                if li in self.base:  # earlier batches' W − W0 (this batch has not touched layer li yet)
                    drift = arch.to_out_in(arch.get_weight(lm.model, li).detach().cpu() - self.base[li])
                state, held = self.state[li], Kn
                if Kn is not None and cfg.neighbour_null:  # they shape the null space instead of ‖ΔW Kn‖²
                    state, held = self._neighbour_null_state(li, Kn), None
                release_freed()  # the key passes' activations, before the solve's matrices
                dW = self.spec.solve(K.cpu(), R_cols.cpu(), self.C.get(li), state, cfg, drift, held)
                if not torch.isfinite(dW).all():
                    raise NonFiniteUpdateError(
                        f"the {cfg.method} solve at layer {li} is not finite; the batch was not applied"
                    )
                W = arch.get_weight(lm.model, li)
                applied = arch.from_out_in(dW).to(W.dtype).to(W.device).contiguous()
                with torch.no_grad():
                    W.add_(applied)
                deltas[li] = applied.cpu()
                # Kept neighbour keys ride with the batch's keys: Σ Kp Kpᵀ, the ledger and rollback see one set.
                keys[li] = (
                    torch.cat([K.cpu(), Kn], dim=1) if Kn is not None and cfg.neighbour_kept else K.cpu()
                )
                timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        except BaseException:
            self.restore(originals)
            raise
        return deltas, keys

    def _neighbour_null_state(self, li: int, Kn: torch.Tensor) -> LayerState:
        """This batch's layer state with the null space of C + w·(tr C / tr Cn)·Cn, Cn = Kn Knᵀ / n: the
        directions the neighbours use leave the null space (the persisted basis is not changed)."""
        Kn = Kn.to(torch.float64)
        mixed = mixed_covariance(self.C[li], Kn @ Kn.T / Kn.shape[1], self.cfg.neighbour_weight)
        basis, complement = self._null_space(mixed)
        return LayerState(
            self.state[li].d_in, previous=self.state[li].previous, null_basis=basis, complement=complement
        )

    def _null_space(self, C: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The null space of C as (basis, complement): λ_∅'s solve needs U itself; the kernel solve takes whichever
        of U and V is smaller."""
        cfg = self.cfg
        if cfg.lambda_null:
            return null_space_basis(C, cfg.tau, cfg.tau_relative), False
        return null_space_split(C, cfg.tau, cfg.tau_relative)

    def _neighbour_passes(self, requests: Sequence[EditRequest]) -> tuple[KeyPasses, float] | None:
        """Key passes over the requests' neighbours and the scale of their keys (√(weight / neighbours per
        request)); None when the config holds none."""
        cfg = self.cfg
        if not cfg.neighbour_weight or not cfg.neighbour_names:
            return None
        near = neighbour_requests(requests, self.names, cfg.neighbour_names)
        if not near:
            return None
        passes = KeyPasses(self.lm, near, self.text_templates, self.layers[-1], onednn=cfg.values.onednn)
        return passes, (cfg.neighbour_weight * len(requests) / len(near)) ** 0.5

    def add_previous_keys(self, keys: dict[int, torch.Tensor]) -> None:
        """An applied batch's keys join the method state (Σ Kp Kpᵀ) that later batches preserve."""
        for li in self.layers:
            self.state[li].add_keys(keys[li])

    def apply_batch(
        self,
        requests: Sequence[EditRequest],
        harden: Hardener | None = None,
        originals: dict[int, torch.Tensor] | None = None,
    ) -> BatchReport:
        """Optimise, solve and apply one batch; with `harden`, re-solve facts predicted not to survive."""
        timings = {"keys": 0.0, "z": 0.0, "solve": 0.0}
        t0 = time.perf_counter()
        values = self.optimise(requests)
        release_freed()  # the optimisation's activations, before the solves' matrices
        timings["z"] = time.perf_counter() - t0
        # the caller's copy of the edited layers' weights, when it holds one (as they are now: unchanged by `optimise`)
        originals = originals if originals is not None else self.weights()
        deltas, keys = self.solve(requests, values.delta, timings, originals)
        retry = None
        if self.cfg.retry_rounds:
            t = time.perf_counter()
            try:
                sims = harden.simulations if harden is not None else ()
                deltas, keys, delta, retry = resolve_failed(
                    self, requests, values, originals, deltas, keys, self.cfg.retry_rounds, sims
                )
                values = replace(values, delta=delta)  # hardening starts from the retried δ
            except BaseException:
                self.restore(originals)
                raise
            timings["retry"] = time.perf_counter() - t
        hardening = None
        if harden is not None:
            t = time.perf_counter()
            try:
                deltas, keys, hardening = harden.run(self, requests, values, originals, deltas, keys, timings)
            except BaseException:
                self.restore(originals)
                raise
            timings["harden"] = time.perf_counter() - t
        self.add_previous_keys(keys)
        return BatchReport(deltas, keys, values.steps, values.converged, timings, hardening, retry)
