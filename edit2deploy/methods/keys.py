"""Keys: the edited projection's input at the subject's last token (docs/method.md, step 1).

k = ½·k(bare prompt) + ½·mean(k over the prompt behind each generated prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..arch import input_device
from ..forward import StopForward, frozen_linears_on_onednn, replay_lower_blocks, run_until_stop
from ..models import LoadedModel
from ..requests import EditRequest
from ..scoring import document_start, length_buckets, pad_batch, pad_id

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_prefixes(
    lm: LoadedModel, n_tokens: int = 10, seeds: Sequence[str] = PREFIX_SEEDS, seed: int = 0
) -> list[str]:
    """Short top-k (5) samples from a few seed words, as MEMIT does; each becomes a prefix ("<prefix>. ").

    Sampled with a fixed seed (greedy decoding from one word degenerates on small models). They are
    stored with the method state so later batches use the same contexts.
    """
    tok, model = lm.tokenizer, lm.model
    device = input_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = document_start(tok)  # a new document, so the samples are prose (see `document_start`)
    out = []
    for i, word in enumerate(seeds):
        ids = torch.tensor([start + tok(word)["input_ids"]], device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=5,
                max_new_tokens=n_tokens - 1,
                pad_token_id=pad,
            )
        text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        text = " ".join((word + text).replace("{", " ").replace("}", " ").split())
        out.append(text)
    return out


def context_templates(prefixes: Sequence[str]) -> list[str]:
    """ "{}" (the bare prompt) first, then one template per prefix."""
    return ["{}"] + [p + ". {}" for p in prefixes]


@dataclass(frozen=True)
class Located:
    """A tokenized context with the index of the subject's last token (its last occurrence: the one a key is
    read at) and of every occurrence (a chat context that restates the prompt holds the subject twice)."""

    ids: list[int]
    subject_last: int
    subject_lasts: tuple[int, ...] = ()
    restated: int | None = None  # first token of the prompt's last copy, in a context that restates it

    @property
    def occurrences(self) -> tuple[int, ...]:
        return self.subject_lasts or (self.subject_last,)


def locate_subject(tokenizer, text: str, subject_start: int, subject_end: int) -> Located:
    """Tokenize `text` (with the model's special tokens) and find the last token overlapping the subject.

    Uses character offsets, so it works whether or not the tokenizer prepends BOS and however the
    subject's first/last characters merge with their neighbours.
    """
    return locate_spans(tokenizer, text, [(subject_start, subject_end)])


def locate_spans(
    tokenizer, text: str, spans: Sequence[tuple[int, int]], restated_at: int | None = None
) -> Located:
    """Tokenize `text` and find the last token overlapping each (start, end) character span (and, with
    `restated_at`, the first token ending after that character)."""
    # A text that already opens with BOS (a rendered chat template) gets no second one.
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    lasts = []
    for start, end in spans:
        last = None
        for i, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and s < end and e > start:
                last = i
        if last is None:
            raise ValueError(f"subject span {start}:{end} not found in tokens of {text!r}")
        lasts.append(last)
    restated = None
    if restated_at is not None:
        restated = next((i for i, (_, e) in enumerate(enc["offset_mapping"]) if e > restated_at), None)
    return Located(list(enc["input_ids"]), lasts[-1], tuple(lasts) if len(lasts) > 1 else (), restated)


def fill_template(template: str, request: EditRequest) -> tuple[str, list[tuple[int, int]]]:
    """The template with every "{}" replaced by the request's prompt, and the subject's character span in each."""
    parts = template.split("{}")
    text, spans = parts[0], []
    for part in parts[1:]:
        start = len(text) + request.prompt.index("{}")
        spans.append((start, start + len(request.subject)))
        text += request.text + part
    return text, spans


def locate_in_template(tokenizer, template: str, request: EditRequest) -> Located:
    """The request's prompt placed in a context template (at each "{}"), with its subject located (and, when the
    template restates the prompt, where its last copy starts)."""
    text, spans = fill_template(template, request)
    # where the last copy of the prompt's text begins
    last_copy = spans[-1][0] - request.prompt.index("{}") if len(spans) > 1 else None
    return locate_spans(tokenizer, text, spans, last_copy)


def answer_follows_prompt(template: str) -> bool:
    """Whether the answer continues the prompt's text (" Rome", after a space) or opens the assistant's reply
    ("Rome", right after the chat template's assistant header)."""
    return template.endswith("{}")


def key_columns(k: torch.Tensor, chat_from: int | None = None) -> torch.Tensor:
    """Keys (columns, d_in) from per-context keys k (n, contexts, d_in), the bare prompt's first.

    k = ½·k(bare) + ½·mean(k over the other contexts). With `chat_from`, the contexts from that index on (chat
    contexts) are left out of it and give each request a second column, their mean: n text keys, then n chat keys.
    """
    text = k[:, :chat_from] if chat_from is not None else k
    keys = 0.5 * text[:, 0] + 0.5 * text[:, 1:].mean(1) if text.shape[1] > 1 else text[:, 0]
    if chat_from is None:
        return keys
    return torch.cat([keys, k[:, chat_from:].mean(1)], dim=0)


class KeyPasses:
    """Keys for each layer of a spread (docs/method.md, step 3), one forward pass per layer.

    The spread updates one layer between passes, and an update at layer l changes nothing below block l.
    So each pass caches the input of the block it edits next, and the next pass resumes there instead of
    running from the embeddings. Rows end at the subject's last token (causal attention: nothing after it
    affects k or h there) and every pass stops at the z layer.
    """

    def __init__(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        templates: Sequence[str],
        z_layer: int,
        onednn: bool = True,
        chat_from: int | None = None,
        chat_outputs: bool = False,
    ):
        self.lm, self.n_req, self.n_t, self.z_layer = lm, len(requests), len(templates), z_layer
        self.onednn = onednn
        # Templates from `chat_from` on are chat contexts with a key column of their own (`key_columns`).
        self.chat_from = chat_from if chat_from is not None and chat_from < len(templates) else None
        # With `chat_outputs`, the z-layer outputs get the chat columns too (the mean over the chat contexts).
        self.chat_outputs = chat_outputs
        self.device = input_device(lm.model)
        self.located = [locate_in_template(lm.tokenizer, t, r) for r in requests for t in templates]
        self.buckets = length_buckets([x.subject_last + 1 for x in self.located])
        self.resume_block: int | None = None  # block whose cached input the next pass starts from
        self.resume_h: list[torch.Tensor] = []  # per bucket: that block's input hidden states
        self.returns_tuple = False

    def _blocks(self, upto: int) -> list[torch.nn.Module]:
        return [self.lm.model.get_submodule(self.lm.arch.block_name(i)) for i in range(upto)]

    @torch.no_grad()
    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K (d_in, n) at `layer` (`key_columns`: (d_in, 2n) with separate chat keys), and the z-layer block output (d, n) at the
        subject's last token of the bare prompt, on the model as it is now."""
        model, arch, dev = self.lm.model, self.lm.arch, self.device
        if self.resume_block is not None and layer < self.resume_block:
            raise ValueError(f"layers must be visited in ascending order ({layer} after {self.resume_block})")
        d_in = arch.to_out_in(arch.get_weight(model, layer)).shape[1]
        k_all = torch.zeros(len(self.located), d_in, dtype=torch.float64, device=dev)
        h_all = torch.zeros(
            len(self.located), model.config.get_text_config().hidden_size, dtype=torch.float64, device=dev
        )
        next_h: list[torch.Tensor] = []
        # The weights are fixed during one pass (updates land between passes), so they can be packed for it.
        run = [
            model.get_submodule(arch.block_name(i)) for i in range(self.resume_block or 0, self.z_layer + 1)
        ]
        with frozen_linears_on_onednn(run if self.onednn else []):
            self._pass(layer, k_all, h_all, next_h)
        self.resume_block, self.resume_h = layer, next_h
        keys = key_columns(k_all.reshape(self.n_req, self.n_t, -1), self.chat_from)
        h_ctx = h_all.reshape(self.n_req, self.n_t, -1)
        h = h_ctx[:, 0]
        if (
            self.chat_outputs and self.chat_from is not None
        ):  # the chat column's own output: its contexts' mean
            h = torch.cat([h, h_ctx[:, self.chat_from :].mean(1)], dim=0)
        return keys.T.contiguous(), h.T.contiguous()

    def _pass(self, layer: int, k_all: torch.Tensor, h_all: torch.Tensor, next_h: list[torch.Tensor]) -> None:
        """One pass over every bucket: keys at `layer` into k_all, z-layer outputs into h_all, and each
        bucket's input to block `layer` (where the next pass resumes) appended to next_h."""
        lm, model, arch, dev = self.lm, self.lm.model, self.lm.arch, self.device
        for b, bucket in enumerate(self.buckets):
            part = [self.located[i] for i in bucket]
            ids, mask, pos, offsets = pad_batch(
                [x.ids[: x.subject_last + 1] for x in part], pad_id(lm.tokenizer), "right"
            )
            rows = torch.arange(len(part))
            cols = torch.tensor([o + x.subject_last for o, x in zip(offsets, part)])
            captured: dict[str, torch.Tensor] = {}

            def block_in(_m, args, kwargs, captured=captured):
                captured["in"] = (args[0] if args else kwargs["hidden_states"]).detach()

            def key_hook(_m, inputs, rows=rows, cols=cols, captured=captured):
                captured["k"] = inputs[0][rows, cols].double().to(dev)

            def out_hook(_m, _inputs, output, rows=rows, cols=cols, captured=captured):
                self.returns_tuple = isinstance(output, tuple)
                h = output[0] if self.returns_tuple else output
                captured["h"] = h[rows, cols].double().to(dev)
                raise StopForward

            handles = [
                model.get_submodule(arch.block_name(layer)).register_forward_pre_hook(
                    block_in, with_kwargs=True
                ),
                model.get_submodule(arch.mlp_out_name(layer)).register_forward_pre_hook(key_hook),
                model.get_submodule(arch.block_name(self.z_layer)).register_forward_hook(out_hook),
            ]
            inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": pos.to(dev)}
            try:
                if (
                    self.resume_block
                ):  # blocks below it are unchanged since the last pass: replay their output
                    cached = self.resume_h[b]
                    with replay_lower_blocks(
                        self._blocks(self.resume_block), lambda c=cached: c, self.returns_tuple
                    ):
                        run_until_stop(model.base_model, **inputs)
                else:
                    run_until_stop(model.base_model, **inputs)
            finally:
                for h in handles:
                    h.remove()
            k_all[bucket] = captured["k"]
            h_all[bucket] = captured["h"]
            next_h.append(captured["in"])


def keys_and_outputs(
    lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], layer: int, z_layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K (d_in, n) at `layer`, averaged ½ bare / ½ prefixed, and the block output at `z_layer` (d, n)
    at the subject's last token of the bare prompt (a fresh pass from the embeddings)."""
    return KeyPasses(lm, requests, templates, z_layer)(layer)
