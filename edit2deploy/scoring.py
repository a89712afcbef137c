"""The `Scorer` protocol and its torch implementation.

Every check (facts, verification, survival) is written once against `Scorer`; each runtime
(torch, llama.cpp, onnxruntime, bitsandbytes) implements it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from .arch import head_logits, input_device

if TYPE_CHECKING:
    from .generation import StopRule


@dataclass(frozen=True)
class Scored:
    """Teacher-forced scores of one continuation after one prompt."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log p(target token i | prompt, target[:i])
    greedy_ids: tuple[int, ...]  # argmax at each of those positions

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        """Mean per-token log-prob (ROME/MEMIT's CounterFact comparison)."""
        return self.total / max(1, len(self.logprobs))

    @property
    def greedy_matches(self) -> bool:
        """Greedy decoding would produce exactly the target tokens."""
        return tuple(self.greedy_ids) == tuple(self.target_ids)


def scored_from_logits(p_ids: Sequence[int], c_ids: Sequence[int], logits: np.ndarray) -> Scored:
    """The `Scored` of a continuation from its logits rows (one per continuation token, the row predicting it), as
    the numpy runtimes (llama.cpp, onnxruntime) give them: log p(token) = its logit − logsumexp(row). The
    exponentials are taken in float32 and summed in float64, so no vocabulary-wide float64 copy of a long
    continuation (the perplexity text's) is made."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=1, keepdims=True)
    e = x - m
    np.exp(e, out=e)
    lse = m[:, 0].astype(np.float64) + np.log(e.sum(axis=1, dtype=np.float64))
    target = np.asarray(c_ids, dtype=np.int64)
    lp = x[np.arange(len(target)), target].astype(np.float64) - lse
    return Scored(
        prompt_ids=tuple(int(t) for t in p_ids),
        target_ids=tuple(int(t) for t in c_ids),
        logprobs=tuple(float(v) for v in lp),
        greedy_ids=tuple(int(t) for t in x.argmax(axis=1)),
    )


@runtime_checkable
class Scorer(Protocol):
    """Teacher-forced per-token log-probs of continuations, plus greedy ids, in one runtime."""

    name: str

    def tokenize(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt ids (with the runtime's BOS handling) and continuation ids (no special tokens)."""
        ...

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        """Score each (prompt, continuation) pair."""
        ...


def hf_tokenize(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Prompt with the tokenizer's own special tokens (BOS where the model wants one); continuation bare."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not prompt_ids:  # no BOS and an empty prompt: nothing to condition the first token on
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
    if not cont_ids:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
    return list(prompt_ids), list(cont_ids)


def pad_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS, else 0 (masked out either way)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pid if pid is not None else 0


DOCUMENT_SEPARATOR = "<|endoftext|>"  # GPT-2's, kept by SmolLM2, Qwen2 and others between training documents


def document_start(tokenizer) -> list[int]:
    """Ids to put before a generation seed so the model starts a new document, not mid-text.

    Tokenizers that add a BOS themselves need none. Others (SmolLM2's, GPT-2's) were trained on documents joined by
    `<|endoftext|>`: without it a bare first word is read as the middle of some text, and SmolLM2 continues "The" with
    "-the-key-to-be-" instead of prose. Falls back to the BOS, then the EOS token.
    """
    probe = tokenizer("The", add_special_tokens=True)["input_ids"]
    if probe and probe[0] in set(tokenizer.all_special_ids):
        return []
    sep = tokenizer.get_vocab().get(DOCUMENT_SEPARATOR)  # (SmolLM2's UNK is this token too)
    if sep is not None:
        return [sep]
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [tid]
    return []


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad id lists into (input_ids, attention_mask, position_ids, offsets).

    `offsets[i]` is where sequence i starts in its row (non-zero for left padding). Positions come
    from the mask, so left- and right-padded batches give the same logits as unpadded ones.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        start = width - len(s) if side == "left" else 0
        ids[i, start : start + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, start : start + len(s)] = 1
        offsets.append(start)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, offsets


def length_buckets(lengths: Sequence[int], waste: float = 0.15) -> list[list[int]]:
    """Group indices (longest first) so each group's padded size is ≤ (1 + waste) × its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    real = 0
    for i in order:
        if buckets:
            width = lengths[buckets[-1][0]]
            if width * (len(buckets[-1]) + 1) <= (1 + waste) * (real + lengths[i]):
                buckets[-1].append(i)
                real += lengths[i]
                continue
        buckets.append([i])
        real = lengths[i]
    return buckets


class TorchScorer:
    """Scores with a (Hugging Face) torch model, batched."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 32, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.pad_id = pad_id(tokenizer)

    def tokenize(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        return hf_tokenize(self.tokenizer, prompt, continuation)

    def _target_logprobs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        chunk: Sequence[int],
        offsets: Sequence[int],
        tokenized: Sequence[tuple[list[int], list[int]]],
    ) -> torch.Tensor:
        """Log-probs (n_scored, vocab) at the positions that predict each row's continuation, in row order.

        Only those positions go through the head: on short prompts the vocabulary projection at every
        position is a fifth of the pass (same logits; the model's own head via `head_logits`).
        """
        where_r, where_c = [], []
        for row, i in enumerate(chunk):
            p_ids, c_ids = tokenized[i]
            first = offsets[row] + len(p_ids) - 1
            where_r += [row] * len(c_ids)
            where_c += range(first, first + len(c_ids))
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": False}
        body = getattr(self.model, "base_model", None)
        if body is None or body is self.model or self.model.get_output_embeddings() is None:
            logits = self.model(**inputs).logits[where_r, where_c]  # no separable head: score every position
        else:
            logits = head_logits(self.model, body(**inputs)[0][where_r, where_c])
        return torch.log_softmax(logits.float(), dim=-1).to(ids.device)

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        tokenized = [self.tokenize(p, c) for p, c in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(tokenized[i][0]) + len(tokenized[i][1])))
        out: list[Scored | None] = [None] * len(pairs)
        device = input_device(self.model)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = [tokenized[i][0] + tokenized[i][1][:-1] for i in chunk]
            ids, mask, pos, offsets = pad_batch(seqs, self.pad_id, self.padding_side)
            logp = self._target_logprobs(
                ids.to(device), mask.to(device), pos.to(device), chunk, offsets, tokenized
            )
            at = 0
            for row, i in enumerate(chunk):
                p_ids, c_ids = tokenized[i]
                rows = logp[at : at + len(c_ids)]
                at += len(c_ids)
                target = torch.tensor(c_ids, device=device)
                lp = rows.gather(-1, target[:, None])[:, 0]
                out[i] = Scored(
                    prompt_ids=tuple(p_ids),
                    target_ids=tuple(c_ids),
                    logprobs=tuple(float(x) for x in lp),
                    greedy_ids=tuple(int(x) for x in rows.argmax(-1)),
                )
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _greedy(
        self,
        seqs: Sequence[Sequence[int]],
        max_new_tokens: int,
        until: Sequence[StopRule | None] | None = None,
    ) -> list[str]:
        """Greedy continuations of token sequences, batched (left-padded, positions from the mask); a row with a stop
        rule ends once the rule holds for its text (a batch runs until its last row ends)."""
        from transformers import StoppingCriteriaList

        device = input_device(self.model)
        until = list(until) if until is not None else [None] * len(seqs)
        out: list[str] = [""] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids, mask, _, _ = pad_batch([list(seqs[i]) for i in chunk], self.pad_id, "left")
            rules = RowStops(self.tokenizer, ids.shape[1], [until[i] for i in chunk])
            gen = self.model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([rules]) if rules.active else None,
            )
            for row, i in enumerate(chunk):
                new = gen[row, ids.shape[1] :].tolist()[: rules.length[row]]
                out[i] = self.tokenizer.decode(new, skip_special_tokens=True)
        return out

    def complete_many(
        self, prompts: Sequence[str], max_new_tokens: int, until: Sequence[StopRule | None] | None = None
    ) -> list[str]:
        """Greedy plain-text continuations (each prompt with the tokenizer's own special tokens, as scored)."""
        seqs = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        return self._greedy(seqs, max_new_tokens, until)

    def chat_many(
        self,
        conversations: Sequence[list[dict[str, str]]],
        max_new_tokens: int,
        until: Sequence[StopRule | None] | None = None,
    ) -> list[str | None]:
        """Greedy replies through the tokenizer's chat template (`apply_chat_template`); None without one."""
        if not getattr(self.tokenizer, "chat_template", None):
            return [None] * len(conversations)
        texts = [
            self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            for m in conversations
        ]
        return self._greedy(
            [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], max_new_tokens, until
        )

    def complete(self, prompt: str, max_new_tokens: int, until: StopRule | None = None) -> str:
        return self.complete_many([prompt], max_new_tokens, [until])[0]

    def chat(
        self, messages: list[dict[str, str]], max_new_tokens: int, until: StopRule | None = None
    ) -> str | None:
        return self.chat_many([messages], max_new_tokens, [until])[0]


class RowStops:
    """A transformers stopping criterion (called with the ids so far, returns one flag per row): row r is done once
    `rules[r]` holds for its decoded new text; `length[r]` is how many new tokens it kept (the rest is padding)."""

    def __init__(self, tokenizer, prompt_len: int, rules: Sequence[StopRule | None]):
        self.tokenizer, self.prompt_len, self.rules = tokenizer, prompt_len, list(rules)
        self.length: list[int | None] = [None] * len(self.rules)
        self.active = any(r is not None for r in self.rules)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_len
        for row, rule in enumerate(self.rules):
            if rule is not None and self.length[row] is None:
                new = input_ids[row, self.prompt_len :].tolist()
                if rule(self.tokenizer.decode(new, skip_special_tokens=True)):
                    self.length[row] = n
        return torch.tensor([x is not None for x in self.length], device=input_ids.device)


def prob(logprob: float) -> float:
    return math.exp(logprob)
