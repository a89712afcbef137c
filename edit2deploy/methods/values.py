"""Target values z: one δ per request at the last edited layer's block output (docs/method.md, step 2).

All requests of a batch are optimised together: one padded forward/backward per step over every
(request, context) row, rows grouped into a few length buckets so padding stays small. A request
that is done (MPES: the target is the argmax at every target position in every context, then
`mpes_extra` more steps; without MPES: ROME's loss threshold) leaves the batch and its δ is frozen.
Blocks below the z layer do not depend on δ, so they run once; later steps replay their output.

Under torchrun (`shared_values`) the requests are dealt out over the processes and the results gathered: each
request's δ depends only on its own rows (its loss terms, clamp and Adam moments are its own, and nothing is
random), so which process optimises it changes it only by float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from .. import distributed
from ..arch import head_logits, input_device
from ..forward import (
    StopForward,
    frozen_linears_on_onednn,
    onednn_available,
    replay_lower_blocks,
    run_until_stop,
)
from ..models import LoadedModel
from ..precision import cpu_has_fast_bf16, held_dtype, upcasts_half_linears
from ..probes import continuation
from ..requests import EditRequest
from ..scoring import length_buckets, pad_batch, pad_id
from .keys import answer_follows_prompt, locate_in_template, locate_subject


@dataclass(frozen=True)
class ValueHParams:
    lr: float = 0.5
    max_steps: int = 25
    clamp: float = 0.75  # ‖δ‖ ≤ clamp·‖h‖
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    # Weight of the restated reply's KL: in a chat context whose reply restates the prompt, the next-token
    # distributions of the reply before its answer are held to the unedited model's (mean KL per position). A δ
    # at the user turn's subject that derails the reply (a new answer that makes the model start its reply in
    # that answer's language or about it, instead of about the subject) costs here. 0: off.
    reply_kl: float = 0.0
    mpes: bool | None = None  # None: the method's own choice (see METHODS)
    mpes_extra: int = 1
    loss_stop: float = 5e-2  # without MPES: ROME's stop once the loss is this small
    group: int = 0  # requests optimised together per forward/backward (0: the whole batch)
    # Hardening: > 0 also demands mean log p(target_new) − mean log p(target_true) ≥ margin (nats per token) in
    # every context, with a hinge loss toward it; a request is done only when every context clears it.
    margin: float = 0.0
    # Matmul precision while optimising δ: "auto" = bfloat16 on CUDA (autocast) and on CPUs with native bf16
    # (AMX / AVX512-BF16: ~9x the fp32 matmul rate; with `onednn` only the frozen linears run in bf16, from
    # weights packed once), else float32. z = h + δ is formed with the fp32 h, and keys, statistics and
    # solves are always full precision.
    dtype: str = "auto"
    # Run each step on the tokens from the subject on, attending to cached keys/values of the tokens before
    # it (exact; ~3x fewer tokens per step on CounterFact). False: whole rows, lower blocks replayed.
    prefix_cache: bool = True
    # Rows of a step are grouped so a group's padded tokens are ≤ (1 + bucket_waste) × its real tokens:
    # more waste, fewer and larger forwards (matmul efficiency vs padding).
    bucket_waste: float = 0.15
    # On CPU the model's frozen linears (blocks and head) multiply through oneDNN with their weights packed once,
    # during z-optimisation (in `dtype`'s precision) and key passes (float32): faster than MKL's sgemm on AVX2
    # AMD cores and than bf16 autocast on AMX cores (benchmarks/RESULTS.md).
    onednn: bool = True


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for δ optimisation, or None for plain float32."""
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {setting!r}")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


@dataclass
class ValueResult:
    z: torch.Tensor  # (d, n) float64 target block outputs (h from this pass + δ)
    delta: torch.Tensor  # (d, n) float64 δ; the editor forms z = h_fp32 + δ
    steps: list[int]  # optimisation steps taken per request
    converged: list[bool]  # target was argmax everywhere when the request stopped


@dataclass
class Row:
    """One sequence of the batch: a request's prompt in one context (+ target), or its KL prompt."""

    owner: int  # request index
    ids: list[int]
    subject_last: int
    target_cols: list[int]  # positions whose logits predict the target tokens (empty for KL rows)
    target_ids: list[int]
    is_kl: bool
    is_bare: bool
    is_true: bool = False  # scores target_true (for the margin), not optimised toward
    context: int = 0  # template index
    subject_cols: tuple[
        int, ...
    ] = ()  # every occurrence of the subject (δ goes to each); () = (subject_last,)
    reply_cols: tuple[int, ...] = ()  # positions predicting a restated reply's tokens before its answer

    @property
    def delta_cols(self) -> tuple[int, ...]:
        return self.subject_cols or (self.subject_last,)


def build_rows(
    lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], with_true: bool = False
) -> list[Row]:
    """Rows per request: one per context template (the bare prompt first), then "{subject} is a"; with
    `with_true`, also one per template scoring `target_true` (margin rows)."""
    tok = lm.tokenizer
    rows: list[Row] = []
    for ri, r in enumerate(requests):
        answers = [(r.target_new, False)]
        if with_true and r.target_true:
            answers.append((r.target_true, True))
        for answer, is_true in answers:
            for ti, t in enumerate(templates):
                text = continuation(answer) if answer_follows_prompt(t) else answer.lstrip()
                target = tok(text, add_special_tokens=False)["input_ids"]
                loc = locate_in_template(tok, t, r)
                cols = [len(loc.ids) - 1 + j for j in range(len(target))]
                first = loc.occurrences[0]  # the prefix cache splits here; δ goes to every occurrence
                # the restated reply's positions before its answer (`reply_kl`)
                reply = (
                    tuple(range(loc.restated - 1, len(loc.ids) - 1)) if loc.restated and not is_true else ()
                )
                rows.append(
                    Row(
                        ri,
                        loc.ids + target[:-1],
                        first,
                        cols,
                        list(target),
                        False,
                        ti == 0,
                        is_true,
                        ti,
                        loc.occurrences if len(loc.occurrences) > 1 else (),
                        reply,
                    )
                )
        loc = locate_subject(tok, f"{r.subject} is a", 0, len(r.subject))
        # The KL term reads the subject's last position (as ROME); causal attention makes later tokens moot.
        rows.append(Row(ri, loc.ids[: loc.subject_last + 1], loc.subject_last, [], [], True, False))
    return rows


def nll_loss(
    tok_logp: torch.Tensor, row_of_tok: torch.Tensor, owner_of_row: torch.Tensor, n: int, n_contexts: int
) -> torch.Tensor:
    """Per request: mean over its contexts of the mean target-token NLL."""
    n_rows = len(owner_of_row)
    row_sum = torch.zeros(n_rows, device=tok_logp.device).index_add(0, row_of_tok, -tok_logp)
    row_cnt = torch.zeros(n_rows, device=tok_logp.device).index_add(0, row_of_tok, torch.ones_like(tok_logp))
    per_row = row_sum / row_cnt.clamp(min=1)
    return torch.zeros(n, device=tok_logp.device).index_add(0, owner_of_row, per_row) / n_contexts


def row_means(tok_lp: torch.Tensor, row_of_tok: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean log-prob of each row's scored tokens."""
    total = torch.zeros(n_rows, device=tok_lp.device).index_add(0, row_of_tok, tok_lp)
    count = torch.zeros(n_rows, device=tok_lp.device).index_add(0, row_of_tok, torch.ones_like(tok_lp))
    return total / count.clamp(min=1)


def margin_hinge(
    margins: torch.Tensor, owner: torch.Tensor, n: int, n_contexts: int, m: float
) -> torch.Tensor:
    """Per request: mean over its contexts of max(0, m − (lp(new) − lp(true)))."""
    return torch.zeros(n, device=margins.device).index_add(0, owner, F.relu(m - margins)) / n_contexts


def kl_divergence(logp_cur: torch.Tensor, logp_init: torch.Tensor) -> torch.Tensor:
    """KL(p_cur ‖ p_init) per row."""
    return (logp_cur.exp() * (logp_cur - logp_init)).sum(-1)


def weight_decay(delta: torch.Tensor, h: torch.Tensor, wd: float) -> torch.Tensor:
    """wd · ‖δ‖ / ‖h‖² per request."""
    return wd * delta.norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-8) ** 2


def clamp_norm_(delta: torch.Tensor, h: torch.Tensor, clamp: float) -> None:
    """‖δ‖ ≤ clamp · ‖h‖, in place."""
    limit = clamp * h.norm(dim=-1, keepdim=True)
    norm = delta.norm(dim=-1, keepdim=True)
    delta.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm)))


class _Batch:
    """The padded rows and everything the per-step forward needs.

    Nothing before a row's subject depends on δ, and nothing at or below the z layer does either. So a
    setup (no grad) keeps, per row, the keys/values of the tokens before the subject at every layer (the
    prefix cache: those tokens through the whole model) and the z layer's output from the subject on (the
    suffix: those tokens through the blocks up to the z layer only). Each optimisation step then
    runs only the suffix, and only through the blocks above the z layer: about a third of the tokens of the
    full rows on CounterFact prompts, with the same result (test). `prefix_cache=False` splits every row at 0
    (the whole row is suffix), which is the plain replay of the lower blocks.
    """

    def __init__(self, lm: LoadedModel, rows: list[Row], z_layer: int, prefix_cache: bool = True):
        self.lm, self.rows = lm, rows
        self.device = input_device(lm.model)
        self.blocks = [lm.model.get_submodule(lm.arch.block_name(i)) for i in range(z_layer + 1)]
        self.split = [r.subject_last if prefix_cache else 0 for r in rows]  # first suffix position per row
        self.suffix_len = [len(r.ids) - s for r, s in zip(rows, self.split)]
        self.returns_tuple = False
        self.suffix_h: torch.Tensor | None = None  # (rows, S_max, d) z-layer output from the split on
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (rows, heads, P_max, hd)

    def suffix_col(self, i: int, col: int) -> int:
        """Where position `col` of row i sits in its suffix."""
        return col - self.split[i]

    @torch.no_grad()
    def prepare(self, h_init: torch.Tensor) -> None:
        """The prefix caches (the tokens before each split, through every layer), the suffix z-layer outputs
        (the tokens from the split on, through the blocks up to the z layer only) and h at each bare
        prompt's subject (h_init, per request)."""
        lm, rows, dev = self.lm, self.rows, self.device
        p_max, s_max = max(self.split), max(self.suffix_len)
        d = lm.model.config.get_text_config().hidden_size
        self.suffix_h = torch.zeros(len(rows), s_max, d, device=dev)
        pid = pad_id(lm.tokenizer)
        with_prefix = [i for i in range(len(rows)) if self.split[i] > 0]
        for bucket in length_buckets([self.split[i] for i in with_prefix]):
            sel = [with_prefix[j] for j in bucket]
            ids, mask, pos, _ = pad_batch([rows[i].ids[: self.split[i]] for i in sel], pid, "right")
            # Plain cache layers: the model's default keeps only a sliding window's worth on some layers.
            out = lm.model.base_model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                cache=DynamicCache(),
                use_cache=True,
            )
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            if not self.prefix_kv:
                self.prefix_kv = [
                    (
                        k.new_zeros(len(rows), k.shape[1], p_max, k.shape[3]),
                        v.new_zeros(len(rows), v.shape[1], p_max, v.shape[3]),
                    )
                    for k, v in kv
                ]
            for j, i in enumerate(sel):
                s = self.split[i]
                for (k_all, v_all), (k, v) in zip(self.prefix_kv, kv):
                    # left-padded: the prefix ends where the suffix starts
                    k_all[i, :, p_max - s :] = k[j, :, :s]
                    v_all[i, :, p_max - s :] = v[j, :, :s]

        captured: dict[str, torch.Tensor] = {}

        def capture(_m, _inp, output):
            self.returns_tuple = isinstance(output, tuple)
            captured["h"] = (output[0] if self.returns_tuple else output).detach()
            raise StopForward

        handle = self.blocks[-1].register_forward_hook(capture)
        try:
            for bucket in length_buckets(self.suffix_len):
                inputs, _ = self._suffix_inputs(bucket)
                run_until_stop(lm.model.base_model, **inputs)
                h = captured.pop("h")
                for j, i in enumerate(bucket):
                    self.suffix_h[i, : self.suffix_len[i]] = h[j, : self.suffix_len[i]]
                    if rows[i].is_bare:
                        h_init[rows[i].owner] = h[j, self.suffix_col(i, rows[i].subject_last)]
        finally:
            handle.remove()

    def _suffix_inputs(self, sel: list[int]) -> tuple[dict, int]:
        """Model inputs for the suffixes of rows `sel` (right-padded to their longest) attending to their
        prefix caches (left-padded, so every prefix ends where its suffix starts); and the padded width."""
        rows, dev = self.rows, self.device
        width = max(self.suffix_len[i] for i in sel)
        p = max(self.split[i] for i in sel)
        p_max = max(self.split)
        ids = torch.full((len(sel), width), pad_id(self.lm.tokenizer), dtype=torch.long)
        mask = torch.zeros(len(sel), p + width, dtype=torch.long)
        pos = torch.zeros(len(sel), width, dtype=torch.long)
        for j, i in enumerate(sel):
            s, n_s = self.split[i], self.suffix_len[i]
            ids[j, :n_s] = torch.tensor(rows[i].ids[s:])
            mask[j, p - s : p + n_s] = 1
            pos[j] = s + torch.arange(width)
        inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": pos.to(dev)}
        if p > 0:
            # Plain layers everywhere: a sliding-window layer would drop prefix entries when pre-filled; the
            # model's own masks still apply each layer's window.
            idx = {dev: torch.tensor(sel, device=dev)}
            cache = DynamicCache()
            for li, (k, v) in enumerate(self.prefix_kv):  # each layer's cache where that layer computes
                if k.device not in idx:
                    idx[k.device] = idx[dev].to(k.device)
                at = idx[k.device]
                cache.update(k[at, :, p_max - p :], v[at, :, p_max - p :], li)
            inputs |= {"cache": cache, "use_cache": True}
        else:
            inputs["use_cache"] = False
        return inputs, width

    def forward(self, sel: list[int], delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the suffixes of rows `sel` (padded to their longest), with δ added at
        each row's subject."""
        rows, dev = self.rows, self.device
        inputs, width = self._suffix_inputs(sel)
        idx = torch.tensor(sel, device=dev)
        at = [
            (j, self.suffix_col(i, c), rows[i].owner) for j, i in enumerate(sel) for c in rows[i].delta_cols
        ]
        local = torch.tensor([a[0] for a in at], device=dev)
        subj = torch.tensor([a[1] for a in at], device=dev)
        owner = torch.tensor([a[2] for a in at], device=dev)
        top = self.suffix_h[idx, :width]

        def with_delta() -> torch.Tensor:
            add = torch.zeros_like(top)
            add[local, subj] = delta[owner].to(top.dtype)
            return top + add

        with replay_lower_blocks(self.blocks, with_delta, self.returns_tuple):
            return self.lm.model.base_model(**inputs)[0].to(dev)


def context_margins(
    rows: Sequence[Row],
    pos_orig: Sequence[int],
    new_lp: torch.Tensor,
    new_pos: torch.Tensor,
    true_lp: torch.Tensor,
    true_pos: torch.Tensor,
    n_pos: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lp(new) − lp(true)) per (request, context) pair present this step, and the owning request of each."""
    device = new_lp.device
    mean_new = row_means(new_lp, new_pos, n_pos)
    mean_true = row_means(true_lp, true_pos, n_pos)
    where: dict[tuple[int, int, bool], int] = {}
    for pos, i in enumerate(pos_orig):
        r = rows[i]
        if not r.is_kl:
            where[(r.owner, r.context, r.is_true)] = pos
    pairs = [(where[(o, c, False)], p, o) for (o, c, t), p in where.items() if t and (o, c, False) in where]
    if not pairs:
        return torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    a = torch.tensor([x[0] for x in pairs], device=device)
    b = torch.tensor([x[1] for x in pairs], device=device)
    owner = torch.tensor([x[2] for x in pairs], device=device)
    return mean_new[a] - mean_true[b], owner


def shared_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    z_layer: int,
    hp: ValueHParams,
    quiet: bool = False,
    group: int = 0,
) -> ValueResult:
    """`optimise_values` for `requests` in groups of `group` (0: all at once), results in request order.

    Under torchrun rank r of N optimises requests r, r + N, r + 2N, ... (in groups of `group`), and every rank
    gets every request's result (`gather_values`). In one process: the groups' results, concatenated."""
    world, rank = distributed.world_size(), distributed.rank()
    mine = list(requests[rank::world]) if world > 1 else list(requests)
    size = group or len(mine)
    parts = [
        optimise_values(lm, mine[i : i + size], templates, z_layer, hp, quiet=quiet)
        for i in range(0, len(mine), size)
    ]
    if parts:
        part = ValueResult(
            z=torch.cat([p.z for p in parts], dim=1),
            delta=torch.cat([p.delta for p in parts], dim=1),
            steps=[s for p in parts for s in p.steps],
            converged=[c for p in parts for c in p.converged],
        )
    else:  # more processes than requests: this one takes part in the gather with none
        d = lm.model.config.get_text_config().hidden_size
        empty = torch.zeros(d, 0, dtype=torch.float64, device=input_device(lm.model))
        part = ValueResult(z=empty, delta=empty.clone(), steps=[], converged=[])
    return gather_values(part, len(requests)) if world > 1 else part


def gather_values(part: ValueResult, n: int) -> ValueResult:
    """The whole batch's values on every rank from each rank's `part`: request i was the (i // N)-th of rank
    i % N's requests. The tensors travel on the CPU (exact: float64 pickled) and come back on `part`'s device."""
    world = distributed.world_size()
    device = part.z.device
    parts = distributed.all_gather_object((part.z.cpu(), part.delta.cpu(), part.steps, part.converged))
    start = [sum(len(p[2]) for p in parts[:r]) for r in range(world)]
    order = [start[i % world] + i // world for i in range(n)]
    steps = [s for p in parts for s in p[2]]
    converged = [c for p in parts for c in p[3]]
    index = torch.tensor(order, dtype=torch.long)
    return ValueResult(
        z=torch.cat([p[0] for p in parts], dim=1).index_select(1, index).to(device),
        delta=torch.cat([p[1] for p in parts], dim=1).index_select(1, index).to(device),
        steps=[steps[j] for j in order],
        converged=[converged[j] for j in order],
    )


def optimise_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    z_layer: int,
    hp: ValueHParams,
    quiet: bool = False,
) -> ValueResult:
    """Find z = h + δ per request so that the model says `target_new` from every context."""
    device = input_device(lm.model)
    cast = autocast_dtype(hp.dtype, device)
    weights = held_dtype(lm.model)
    if weights != torch.float32:
        # Half-precision weights meet the float32 z = h + δ: where their linears do not multiply in float32,
        # autocast brings both to one precision. oneDNN packs only float32 weights (a packed copy of a half model
        # would double it).
        if cast is None and not upcasts_half_linears(device):
            cast = weights
        return _optimise_values(lm, requests, templates, z_layer, hp, quiet, cast=cast)
    linear_dtype = cast or torch.float32
    if hp.onednn and device.type == "cpu" and onednn_available(linear_dtype):
        # The frozen linears carry the chosen matmul precision themselves (bf16 packs on AMX CPUs: faster
        # than autocast, which re-casts every weight at every call); everything else stays float32.
        # Without oneDNN support for that precision, autocast (bf16) or the stock path (fp32) instead.
        with frozen_linears_on_onednn([lm.model], linear_dtype):
            return _optimise_values(lm, requests, templates, z_layer, hp, quiet, cast=None)
    return _optimise_values(lm, requests, templates, z_layer, hp, quiet, cast=cast)


def _optimise_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    z_layer: int,
    hp: ValueHParams,
    quiet: bool,
    cast: torch.dtype | None,
) -> ValueResult:
    """`cast`: the autocast dtype around forwards and head (None: none)."""
    model = lm.model
    use_margin = hp.margin > 0
    rows = build_rows(lm, requests, templates, with_true=use_margin)
    batch = _Batch(lm, rows, z_layer, prefix_cache=hp.prefix_cache)
    device = batch.device
    n = len(requests)
    d = model.config.get_text_config().hidden_size
    delta = torch.zeros(n, d, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    h_init = torch.zeros(n, d, device=device)
    kl_init = None
    reply_init: dict[int, torch.Tensor] = {}  # restated rows' reply distributions before any δ, by row
    active = [True] * n
    countdown = [-1] * n  # MPES: extra steps left once converged (-1: not converged yet)
    steps = [0] * n
    converged = [False] * n
    bar = tqdm(total=n, desc="z-optimisation", unit="req", disable=quiet)
    batch.prepare(h_init)
    reply_rows = [0] * n  # each request's rows with a restated reply (its reply KL is their mean)
    for r in rows:
        reply_rows[r.owner] += bool(r.reply_cols)

    for step in range(hp.max_steps + 1):
        if hp.mpes:
            # A request whose extra steps are used up is done whatever this step's forward would say: it
            # leaves before the forward rather than after (same δ and steps, one forward less each).
            for ri in range(n):
                if active[ri] and countdown[ri] == 0:
                    active[ri] = False
                    bar.update(1)
        sel_all = [i for i, r in enumerate(rows) if active[r.owner]]
        if not sel_all:
            break
        opt.zero_grad()
        # Every loss term is a per-request sum over rows with counts fixed before the step (a row's mean NLL over
        # the contexts, its KL row, its restated rows' mean KL), so each length bucket is backpropagated as soon
        # as it is scored and its activations freed: a step holds one bucket's graph, not every bucket's, for
        # the same gradient up to float rounding. Margins (hardening) pair a context's new and true rows, which
        # may sit in different buckets: with them the step's graph is kept whole and backpropagated once.
        per_bucket = not use_margin
        loss = torch.zeros(n, device=device)
        tok_lp, hits, tok_owner, tok_row, row_owner = [], [], [], [], []
        true_lp, true_row, pos_orig = (
            [],
            [],
            [],
        )  # margin rows' token log-probs; original row of each position
        n_rows = 0
        for bucket in length_buckets([batch.suffix_len[i] for i in sel_all], hp.bucket_waste):
            sel = [sel_all[j] for j in bucket]
            with torch.autocast(device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                hidden = batch.forward(sel, delta)
            g_row, g_col, g_tgt, g_true = [], [], [], []
            kl_rows, kl_cols, kl_owner, b_tok_row = [], [], [], []
            for j, i in enumerate(sel):
                r = rows[i]
                row_owner.append(r.owner)
                pos_orig.append(i)
                if r.is_kl:
                    kl_rows.append(j)
                    kl_cols.append(batch.suffix_col(i, r.subject_last))
                    kl_owner.append(r.owner)
                for c, t in zip(r.target_cols, r.target_ids):
                    g_row.append(j)
                    g_col.append(batch.suffix_col(i, c))
                    g_tgt.append(t)
                    g_true.append(r.is_true)
                    if r.is_true:
                        true_row.append(n_rows + j)
                    else:
                        tok_owner.append(r.owner)
                        tok_row.append(n_rows + j)
                        b_tok_row.append(j)
            # Only the scored positions go through the model's own head.
            with torch.autocast(device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                logits = head_logits(model, hidden[g_row, g_col])
            logp = F.log_softmax(logits.float(), -1)
            tgt = torch.tensor(g_tgt, device=device)
            is_true = torch.tensor(g_true, dtype=torch.bool, device=device)
            lp = logp.gather(-1, tgt[:, None])[:, 0]
            hits.append((logp.argmax(-1) == tgt)[~is_true])
            # KL rows contribute no target tokens, so the NLL mean runs over the context rows only.
            part = nll_loss(
                lp[~is_true],
                torch.tensor(b_tok_row, device=device, dtype=torch.long),
                torch.tensor(row_owner[n_rows:], device=device),
                n,
                len(templates),
            )
            if kl_rows:
                with torch.autocast(device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                    logits = head_logits(model, hidden[kl_rows, kl_cols])
                kl_lp = F.log_softmax(logits.float(), -1)
                owners = torch.tensor(kl_owner, device=device)
                if kl_init is None:
                    kl_init = torch.zeros(n, kl_lp.shape[-1], device=device)
                if step == 0:  # every request is active at the first step: δ = 0, the unedited distributions
                    kl_init[owners] = kl_lp.detach()
                kl = torch.zeros(n, device=device).index_add(0, owners, kl_divergence(kl_lp, kl_init[owners]))
                part = part + hp.kl_factor * kl
            if hp.reply_kl > 0:
                for j, i in enumerate(sel):
                    cols = rows[i].reply_cols
                    if not cols:
                        continue
                    at = [batch.suffix_col(i, c) for c in cols]
                    with torch.autocast(device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                        logits = head_logits(model, hidden[j, at])
                    cur = F.log_softmax(logits.float(), -1)
                    if i not in reply_init:  # first step: δ = 0, the unedited model's distributions
                        reply_init[i] = cur.detach()
                    o = rows[i].owner  # the mean over the request's restated rows
                    one = torch.zeros(n, device=device)
                    one[o] = kl_divergence(cur, reply_init[i]).mean() / reply_rows[o]
                    part = part + hp.reply_kl * one
            if per_bucket:
                part.sum().backward()  # frees this bucket's graph
                part, lp = part.detach(), lp.detach()
            tok_lp.append(lp[~is_true])
            true_lp.append(lp[is_true])
            loss = loss + part
            n_rows += len(sel)
        hit_t = torch.cat(hits)
        loss = loss + weight_decay(delta, h_init, hp.weight_decay)

        all_hit = [True] * n
        for o, h in zip(tok_owner, hit_t.tolist()):
            if not h:
                all_hit[o] = False
        if use_margin:
            margins, m_owner = context_margins(
                rows,
                pos_orig,
                torch.cat(tok_lp),
                torch.tensor(tok_row, device=device),
                torch.cat(true_lp),
                torch.tensor(true_row, device=device),
                n_rows,
            )
            if len(margins):
                loss = loss + margin_hinge(margins, m_owner, n, len(templates), hp.margin)
                for o, ok in zip(m_owner.tolist(), (margins.detach() >= hp.margin).tolist()):
                    if not ok:
                        all_hit[o] = False
        for ri in range(n):
            if not active[ri]:
                continue
            done = step == hp.max_steps
            if hp.mpes:
                if countdown[ri] < 0 and all_hit[ri]:
                    countdown[ri] = hp.mpes_extra
                    converged[ri] = True
                if countdown[ri] == 0:
                    done = True
                elif countdown[ri] > 0:
                    countdown[ri] -= 1
            else:
                converged[ri] = all_hit[ri]
                done = done or float(loss[ri].detach()) < hp.loss_stop
            if done:
                active[ri] = False
                bar.update(1)
        live = torch.tensor(active, device=device)
        if not live.any():
            break
        frozen = delta.detach()[~live].clone()
        loss.sum().backward()  # what is not backpropagated yet: weight decay, and the buckets with margins
        delta.grad[~live] = 0  # a finished request's own loss terms reach its δ row only
        opt.step()
        with torch.no_grad():
            delta[~live] = frozen  # Adam's momentum must not move finished requests
            clamp_norm_(delta, h_init, hp.clamp)
        for ri in range(n):
            steps[ri] += active[ri]
    bar.close()
    z = (h_init + delta.detach()).double().T.contiguous()
    return ValueResult(z=z, delta=delta.detach().double().T.contiguous(), steps=steps, converged=converged)
