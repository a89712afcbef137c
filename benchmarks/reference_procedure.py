"""The reference code's z-optimisation procedure, re-implemented for a same-machine speed comparison.

The reference measurement (ENCORE's repository: AlphaEdit solve + MPES) optimises one request at a
time, and every step runs the whole model over whole rows with the head over every position (ROME's
`compute_z`). Our engine's loss, MPES rule and hyperparameters are reused, so both find the same kind of δ;
only the work per step differs. Used by `edit_speed.py --variants reference-procedure`; keys and solves stay
ours (faster than the reference's), so this understates the reference's time per edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from edit2deploy.methods.values import (
    ValueHParams,
    ValueResult,
    build_rows,
    clamp_norm_,
    kl_divergence,
    weight_decay,
)
from edit2deploy.models import LoadedModel
from edit2deploy.requests import EditRequest
from edit2deploy.scoring import pad_batch, pad_id


def reference_values(
    lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], z_layer: int, hp: ValueHParams
) -> ValueResult:
    model, tok = lm.model, lm.tokenizer
    block = model.get_submodule(lm.arch.block_name(z_layer))
    zs, deltas, steps, converged = [], [], [], []
    for r in requests:
        rows = build_rows(lm, [r], templates)
        ids, mask, pos, _ = pad_batch([x.ids for x in rows], pad_id(tok), "right")
        subj = torch.tensor([x.subject_last for x in rows])
        bare = next(i for i, x in enumerate(rows) if x.is_bare)
        kl_row = next(i for i, x in enumerate(rows) if x.is_kl)
        ctx = [i for i, x in enumerate(rows) if not x.is_kl]
        delta = torch.zeros(model.config.get_text_config().hidden_size, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.lr)
        state: dict[str, torch.Tensor] = {}

        def add_delta(_m, _inp, out, state=state, delta=delta, subj=subj, bare=bare):
            h = out[0] if isinstance(out, tuple) else out
            state.setdefault("h", h[bare, subj[bare]].detach().clone())
            add = torch.zeros_like(h)
            add[torch.arange(len(subj)), subj] = delta.to(h.dtype)
            return (h + add, *out[1:]) if isinstance(out, tuple) else h + add

        handle = block.register_forward_hook(add_delta)
        n_steps, countdown, ok = 0, -1, False
        try:
            for step in range(hp.max_steps + 1):
                logp = F.log_softmax(
                    model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(), -1
                )
                nll, hit = [], True
                for i in ctx:
                    cols = torch.tensor(rows[i].target_cols)
                    tgt = torch.tensor(rows[i].target_ids)
                    lp = logp[i, cols].gather(-1, tgt[:, None])[:, 0]
                    nll.append(-lp.mean())
                    hit = hit and bool((logp[i, cols].argmax(-1) == tgt).all())
                kl_lp = logp[kl_row, subj[kl_row]]
                state.setdefault("kl", kl_lp.detach())
                loss = (
                    torch.stack(nll).mean()
                    + hp.kl_factor * kl_divergence(kl_lp, state["kl"])
                    + weight_decay(delta[None], state["h"][None], hp.weight_decay)[0]
                )
                if hp.mpes:
                    if countdown < 0 and hit:
                        countdown, ok = hp.mpes_extra, True
                    if countdown == 0:
                        break
                    if countdown > 0:
                        countdown -= 1
                else:
                    ok = hit
                    if float(loss) < hp.loss_stop:
                        break
                if step == hp.max_steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    clamp_norm_(delta[None], state["h"][None], hp.clamp)
                n_steps += 1
        finally:
            handle.remove()
        zs.append(state["h"].double() + delta.detach().double())
        deltas.append(delta.detach().double())
        steps.append(n_steps)
        converged.append(ok)
    return ValueResult(torch.stack(zs, 1), torch.stack(deltas, 1), steps, converged)
