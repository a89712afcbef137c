"""Re-solving the edits of a batch that did not take (`retry_rounds`).

The solve reaches only part of each target value: the α / λ_∅ terms and the previous keys pull against it,
and MPES stops δ as soon as the target is just the argmax. With a strong regulariser (e.g. λ_∅ in the
thousands, which is what keeps perplexity down over many sequential edits) some requests of a batch end up
not edited at all. After the solve, each request's edit prompt is scored on the edited model; for every
request whose new target does not beat the true answer (or, without a true answer, is not greedy-decoded),
δ is optimised again *on the edited model* (starting from its hidden state, so it adds what is missing),
added to the request's δ, and the whole batch is solved again from the pre-batch weights — up to `rounds`
times. Only the edit prompt is read: paraphrases and neighbourhood prompts stay out of the loop.

With `retry_chat` the greedy chat reply to the edit prompt must give the new answer too (with `retry_completion`,
its plain greedy continuation), in full precision and, when the batch is hardened for deployment targets, in each
target's simulated quantization (`quantsim.Simulation`): a reply that holds only in full precision often loses its
answer in a 4-bit runtime.

Under torchrun rank 0 decides which edits failed (every rank holds the same weights, `Editor.solve`), the
ranks share their re-optimisation (`shared_values`) and rank 0 re-solves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .. import distributed
from ..generation import DEFAULT_GENERATION, chat_probe, completion_probe, generate
from ..models import LoadedModel
from ..probes import probes_for, run_probes
from ..quantsim import Simulation
from ..requests import EditRequest
from ..scoring import TorchScorer
from .values import ValueResult, shared_values


class BatchEditor(Protocol):
    """What a re-solve needs of the editor (`editor.Editor` is one): its model, contexts, layers and solve."""

    lm: LoadedModel
    templates: Sequence[str]
    layers: Sequence[int]
    cfg: Any

    def restore(self, originals: dict[int, torch.Tensor]) -> None: ...

    def solve(
        self,
        requests: Sequence[EditRequest],
        delta: torch.Tensor,
        timings: dict[str, float],
        originals: dict[int, torch.Tensor] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]: ...


def failed_edits(
    editor: BatchEditor, requests: Sequence[EditRequest], simulations: Sequence[Simulation] = ()
) -> list[int]:
    """Indices of the requests whose edit prompt does not yet give the new target (ES's criterion; with
    `retry_chat` / `retry_completion` also whose chat reply / plain continuation misses, in full precision or in
    any of `simulations`); under torchrun rank 0's list (scored there alone), so every rank takes the same next
    step."""
    failing = None
    if distributed.is_main():
        lm, cfg = editor.lm, editor.cfg
        scorer = TorchScorer(lm.model, lm.tokenizer)
        results = run_probes(scorer, probes_for(requests, ("edit",)))
        bad = {i for i, r in enumerate(results) if not r.success}
        kinds = [k for k, on in (("chat", cfg.retry_chat), ("completion", cfg.retry_completion)) if on]
        if kinds:
            bad |= set(generated_misses(scorer, requests, kinds))
            for sim in simulations:
                with sim.applied():
                    bad |= set(generated_misses(scorer, requests, kinds))
        failing = sorted(bad)
    return distributed.broadcast_object(failing)


def generated_misses(scorer: TorchScorer, requests: Sequence[EditRequest], kinds: Sequence[str]) -> list[int]:
    """Indices of the requests whose greedy generated answer to their prompt does not give the new answer (verify's
    verdict rule): `chat`, the reply through the model's own template (none without one); `completion`, the plain
    continuation."""
    probes, owner = [], []
    for i, r in enumerate(requests):
        for kind in kinds:
            probes.append(chat_probe(r, r.text) if kind == "chat" else completion_probe(r))
            owner.append(i)
    got = generate(scorer, probes, DEFAULT_GENERATION)
    return sorted({owner[j] for j, g in enumerate(got) if g.verdict is not None and g.verdict != "new"})


def resolve_failed(
    editor: BatchEditor,
    requests: Sequence[EditRequest],
    values: ValueResult,
    originals: dict[int, torch.Tensor],
    deltas: dict[int, torch.Tensor],
    keys: dict[int, torch.Tensor],
    rounds: int,
    simulations: Sequence[Simulation] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor, dict]:
    """Up to `rounds` re-solves of the batch with more δ for its failed edits (`simulations`: the targets in whose
    simulated quantization `retry_chat` / `retry_completion` check the generated answers too); returns the deltas and keys as applied, the δ they were
    solved for, and a ledger record (`rounds`: the request ids retried in each; `failed`: those still failing)."""
    ids = [r.id for r in requests]
    delta = values.delta.clone()
    record: dict = {"rounds": [], "failed": []}
    failing = failed_edits(editor, requests, simulations)
    for _ in range(rounds):
        if not failing:
            break
        extra = shared_values(
            editor.lm,
            [requests[i] for i in failing],
            editor.templates,
            editor.layers[-1],
            editor.cfg.values,
            quiet=True,
        )
        for j, ri in enumerate(failing):
            delta[:, ri] += extra.delta[:, j].to(delta.dtype)
        editor.restore(originals)
        deltas, keys = editor.solve(requests, delta, {}, originals)  # its time is the caller's "retry" phase
        record["rounds"].append({"retried": [ids[i] for i in failing], "steps": extra.steps})
        failing = failed_edits(editor, requests, simulations)
    record["failed"] = [ids[i] for i in failing]
    return deltas, keys, delta, record
