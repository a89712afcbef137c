"""Preserved facts: facts the user names as not to change take their keys out of AlphaEdit's null space.

The null space is what the statistics corpus (C) hardly uses. Subjects asked about in short fact prompts
use those directions about twice as much as running text does (benchmarks/RESULTS.md, "Neighbour keys"),
so an edit also moves other well-known subjects. The keys of facts to preserve, averaged over the edit
contexts exactly as an edit's own keys are, add their second moment Cf to C before the null space is
taken: null space of C + w·(tr C / tr Cf)·Cf (w = `preserve_weight`). Their directions leave it, and the
update leaves those facts alone. C itself (MEMIT's and λ_∅'s statistics) is unchanged.

The facts are read on the model as it is when the null space is first built (a model's first edit), and
the basis is kept with the method state, so later runs need not repeat them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..arch import input_device
from ..forward import StopForward, run_until_stop
from ..models import LoadedModel
from ..requests import EditRequest
from ..scoring import length_buckets, pad_batch, pad_id
from .keys import locate_in_template

MAX_ROWS = 64  # rows per forward pass: bounds memory and keeps the progress bar moving


NAME_TEMPLATE = "{} is"  # a name's key sees only the context and the name (causal), so what follows is moot


def name_facts(names: Sequence[str], avoid: Sequence[str] = ()) -> list[EditRequest]:
    """Corpus names as preserved facts, less any that occurs in `avoid` (the texts being edited: a subject whose
    key left the null space would be harder to edit)."""
    text = "\n".join(avoid)
    return [EditRequest(prompt=NAME_TEMPLATE, subject=n, target_new=" a") for n in names if n not in text]


def facts_digest(facts: Sequence[EditRequest]) -> str:
    """SHA-256 of what the keys depend on (prompt and subject of each fact, in order)."""
    return hashlib.sha256(json.dumps([[f.prompt, f.subject] for f in facts]).encode()).hexdigest()


@torch.no_grad()
def preserved_keys(
    lm: LoadedModel,
    facts: Sequence[EditRequest],
    templates: Sequence[str],
    layers: Sequence[int],
    quiet: bool = False,
) -> dict[int, torch.Tensor]:
    """K (d_in, n) per layer: each fact's key, ½ bare + ½ mean over the prefixed contexts (as `KeyPasses`),
    every layer in one forward pass (nothing is edited between them)."""
    model, arch = lm.model, lm.arch
    dev = input_device(model)
    located = [locate_in_template(lm.tokenizer, t, f) for f in facts for t in templates]
    buckets = [
        b[i : i + MAX_ROWS]
        for b in length_buckets([x.subject_last + 1 for x in located])
        for i in range(0, len(b), MAX_ROWS)
    ]
    k_all: dict[int, torch.Tensor] = {}
    last = max(layers)
    bar = tqdm(total=len(located), desc="preserved-fact keys", unit="ctx", disable=quiet)
    try:
        for bucket in buckets:
            part = [located[i] for i in bucket]
            ids, mask, pos, offsets = pad_batch(
                [x.ids[: x.subject_last + 1] for x in part], pad_id(lm.tokenizer), "right"
            )
            rows = torch.arange(len(part))
            cols = torch.tensor([o + x.subject_last for o, x in zip(offsets, part)])

            def hook_for(li: int, bucket=bucket, rows=rows, cols=cols):
                def hook(_m, inputs):
                    # kept in the activations' dtype until the mean (float64): every context's key, every
                    # layer, is the biggest thing this pass holds
                    k = inputs[0][rows, cols].to(dev)
                    if li not in k_all:
                        k_all[li] = torch.zeros(len(located), k.shape[1], dtype=k.dtype, device=dev)
                    k_all[li][bucket] = k
                    if li == last:
                        raise StopForward  # nothing above the last edited projection matters

                return hook

            handles = [
                model.get_submodule(arch.mlp_out_name(li)).register_forward_pre_hook(hook_for(li))
                for li in layers
            ]
            try:
                run_until_stop(
                    model.base_model,
                    input_ids=ids.to(dev),
                    attention_mask=mask.to(dev),
                    position_ids=pos.to(dev),
                )
            finally:
                for h in handles:
                    h.remove()
            bar.update(len(bucket))
    finally:
        bar.close()
    n_t = len(templates)
    out = {}
    for li in layers:
        k = k_all.pop(li).double().reshape(len(facts), n_t, -1)
        keys = 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1) if n_t > 1 else k[:, 0]
        out[li] = keys.T.contiguous().cpu()
    return out


def second_moment(K: torch.Tensor) -> torch.Tensor:
    """Cf = E[k kᵀ] over keys K (d_in, n), float64."""
    return K @ K.T / K.shape[1]
