"""`edit2deploy.scoring.Scorer` in llama.cpp (llama-cpp-python): score a GGUF in the runtime that deploys it.

- Model loading always sets `use_extra_bufts = False`: llama.cpp's CPU weight repacking ("extra buffer types")
  segfaults on quantized GGUFs on AMX CPUs in some builds. `Llama()` has no such keyword in 0.3.36 (unknown
  keywords are swallowed by **kwargs), so the flag is set on the model params while the model loads.
- `logits_all=True` (teacher forcing needs every position), `n_ctx` a multiple of 256, F32 KV cache by default
  (comparisons against torch), llama.cpp's own logging silenced.
- Tokenization: `llama_tokenize(add_special=True, parse_special=True)` for the prompt, so BOS/EOS are added
  exactly when the GGUF's `tokenizer.ggml.add_bos_token`/`add_eos_token` say so; continuations without.
- Pairs are scored in lexicographic order of their token ids and the KV cache is rewound only to the longest
  common prefix with what was evaluated last, so continuations of one prompt share the prompt's evaluation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from edit2deploy.errors import UsageError
from edit2deploy.scoring import Scored, scored_from_logits

from ..threads import shared_threads
from .decoder import MAX_STREAMS, StreamDecoder, greedy_rows
from .quant import captured_stderr, require_llama_cpp

if TYPE_CHECKING:
    from edit2deploy.generation import StopRule

KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def no_extra_bufts() -> Iterator[None]:
    """While a `Llama` is built, hand out model params with `use_extra_bufts = False`."""
    require_llama_cpp()
    import llama_cpp.llama_cpp as lc

    with _LOAD_LOCK:
        original = lc.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = False
            return p

        lc.llama_model_default_params = params
        try:
            yield
        finally:
            lc.llama_model_default_params = original


def round_ctx(n: int) -> int:
    """A context size for `n` tokens: a multiple of 256 (at least 256). With `logits_all`, llama-cpp-python
    keeps an n_ctx x n_vocab float32 score array (256 x 262k Gemma vocabulary = 268 MB), so keep it small."""
    return max(256, (n + 255) // 256 * 256)


def open_llama(
    path: Path | str,
    n_ctx: int = 256,
    logits_all: bool = True,
    kv_type: str = "f32",
    n_threads: int | None = None,
    **kwargs: Any,
):
    """A `llama_cpp.Llama` on a GGUF, with the settings this project relies on (see the module docstring)."""
    llama_cpp = require_llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: GGUF file not found")
    if kv_type not in KV_TYPES:
        raise UsageError(f"kv_type: expected one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    n_ctx = round_ctx(n_ctx)
    threads = n_threads or shared_threads()
    log: list[str] = []
    try:
        with no_extra_bufts(), captured_stderr() as log:  # llama.cpp prints some notes past verbose=False
            llm = _new_llama(llama_cpp, path, n_ctx, logits_all, kv_type, threads, kwargs)
    except Exception as exc:
        tail = "\n".join(log[-8:])
        raise RuntimeError(f"llama.cpp could not open {path}: {exc}\n{tail}") from exc
    if llm.model_params.use_extra_bufts:  # the patch did not reach the loader: refuse rather than crash later
        raise RuntimeError("could not disable llama.cpp's extra buffer types (use_extra_bufts)")
    return llm


def _new_llama(llama_cpp, path: Path, n_ctx: int, logits_all: bool, kv_type: str, threads: int, kwargs: dict):
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=min(n_ctx, 512),
        logits_all=logits_all,
        type_k=KV_TYPES[kv_type],
        type_v=KV_TYPES[kv_type],
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        **{"n_gpu_layers": 0, **kwargs},
    )


class LlamaCppScorer:
    """Teacher-forced per-token log-probs and greedy ids of continuations, computed by llama.cpp on a GGUF."""

    name = "llama.cpp"

    def __init__(
        self, path: Path | str, n_ctx: int = 256, kv_type: str = "f32", n_threads: int | None = None
    ):
        self.path = Path(path)
        self.kv_type = kv_type
        self.n_threads = n_threads
        self._llm = open_llama(self.path, n_ctx=n_ctx, kv_type=kv_type, n_threads=n_threads)
        meta = self._llm.metadata
        self.add_bos = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        self.add_eos = str(meta.get("tokenizer.ggml.add_eos_token", "false")).lower() == "true"

    # ------------------------------------------------------------ plumbing
    @property
    def llm(self):
        """The underlying `llama_cpp.Llama` (not thread-safe)."""
        return self._llm

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    def _ensure_ctx(self, n_tokens: int) -> None:
        if n_tokens <= self.n_ctx:
            return
        self.close()
        self._llm = open_llama(self.path, n_ctx=n_tokens, kv_type=self.kv_type, n_threads=self.n_threads)

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _eval_prefix_shared(self, seq: Sequence[int]) -> None:
        """Make the context hold exactly `seq` (its logits rows valid), reusing the common prefix."""
        llm = self._llm
        cur = llm.input_ids[: llm.n_tokens]
        n = min(len(cur), len(seq))
        diff = np.nonzero(np.asarray(cur[:n]) != np.asarray(seq[:n], dtype=cur.dtype))[0]
        k = int(diff[0]) if len(diff) else n
        if k == len(seq):
            llm.n_tokens = k  # every needed row is already there (later tokens do not change earlier ones)
            return
        llm.n_tokens = k
        llm.eval(list(seq[k:]))

    # ------------------------------------------------------------ Scorer protocol
    def tokenize(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt with the GGUF's own BOS/EOS rule; continuation bare (special-token text parsed in both)."""
        p_ids = self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        c_ids = self._llm.tokenize(continuation.encode("utf-8"), add_bos=False, special=True)
        if not c_ids:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
        return list(p_ids), list(c_ids)

    def score_ids(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
        """Score already-tokenized (prompt ids, continuation ids) pairs."""
        if not pairs:
            return []
        seqs = [list(p) + list(c[:-1]) for p, c in pairs]
        for (p, _), s in zip(pairs, seqs, strict=True):
            if not p:
                raise ValueError("empty prompt: nothing to condition the first continuation token on")
        self._ensure_ctx(max(len(s) for s in seqs) + 1)
        out: list[Scored | None] = [None] * len(pairs)
        for i in sorted(range(len(pairs)), key=lambda j: seqs[j]):
            p_ids, c_ids = pairs[i]
            self._eval_prefix_shared(seqs[i])
            first = len(p_ids) - 1
            out[i] = scored_from_logits(p_ids, c_ids, self._llm.scores[first : first + len(c_ids)])
        return out  # type: ignore[return-value]

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        return self.score_ids([self.tokenize(p, c) for p, c in pairs])

    # ------------------------------------------------------------ extras (tests, reports)
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Raw logits (n_tokens, n_vocab), float32, at every position of `ids`."""
        self._ensure_ctx(len(ids))
        self._eval_prefix_shared(list(ids))
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        """Greedy (argmax) continuation ids, computed step by step on the KV cache."""
        ids = list(prompt_ids)
        self._ensure_ctx(len(ids) + max_new_tokens)
        self._eval_prefix_shared(ids)
        out: list[int] = []
        eos = self._llm.token_eos()
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self._llm.scores[self._llm.n_tokens - 1]))
            if stop_at_eos and nxt == eos:
                break
            out.append(nxt)
            self._llm.eval([nxt])
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def complete(self, prompt: str, max_new_tokens: int, until: StopRule | None = None) -> str:
        return self.complete_many([prompt], max_new_tokens, [until])[0]

    def chat(
        self, messages: list[dict[str, str]], max_new_tokens: int = 48, until: StopRule | None = None
    ) -> str | None:
        return self.chat_many([messages], max_new_tokens, [until])[0]

    def complete_many(
        self, prompts: Sequence[str], max_new_tokens: int, until: Sequence[StopRule | None] | None = None
    ) -> list[str]:
        """Greedy plain-text continuations (each prompt with the GGUF's BOS rule, as scored)."""
        ids = [self._llm.tokenize(p.encode("utf-8"), add_bos=True, special=False) for p in prompts]
        rules = list(until) if until is not None else [None] * len(ids)
        return [self.detokenize(r) for r in self._greedy_many(ids, max_new_tokens, rules, [()] * len(ids))]

    def chat_many(
        self,
        conversations: Sequence[list[dict[str, str]]],
        max_new_tokens: int = 48,
        until: Sequence[StopRule | None] | None = None,
    ) -> list[str | None]:
        """Greedy replies through the GGUF's own chat template (`tokenizer.chat_template`, rendered and tokenized as
        llama-cpp-python's chat completion does, which also ends a reply at the template's stop strings); None
        without one."""
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return [None] * len(conversations)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        meta, model = self._llm.metadata, self._llm._model
        eos_id = int(meta.get("tokenizer.ggml.eos_token_id", self._llm.token_eos()))
        bos_id = int(meta.get("tokenizer.ggml.bos_token_id", self._llm.token_bos()))
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        ids, stops = [], []
        for messages in conversations:
            res = formatter(messages=messages)
            ids.append(
                self._llm.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
            )
            stops.append(
                () if res.stop is None else (res.stop,) if isinstance(res.stop, str) else tuple(res.stop)
            )
        rules = list(until) if until is not None else [None] * len(ids)
        texts = [self.detokenize(r) for r in self._greedy_many(ids, max_new_tokens, rules, stops)]
        return [_cut_at(text, stop) for text, stop in zip(texts, stops, strict=True)]

    def _greedy_many(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        until: Sequence[StopRule | None],
        stops: Sequence[Sequence[str]],
    ) -> list[list[int]]:
        """Greedy continuation ids of many prompts, decoded together: one KV stream per prompt in a context of its
        own on the same GGUF, so each step evaluates every unfinished row in one batch rather than one row at a
        time (the KV cache in this scorer's type). A row ends early once its text holds one of its `stops` strings
        or its rule in `until` holds for the text before them."""
        out: list[list[int]] = []
        for start in range(0, len(prompts), MAX_STREAMS):
            part = [list(p) for p in prompts[start : start + MAX_STREAMS]]
            done = self._row_done(until[start : start + MAX_STREAMS], stops[start : start + MAX_STREAMS])
            n_ctx = max(len(p) for p in part) + max_new_tokens + 1
            threads = self.n_threads or shared_threads()
            # as this scorer's own context computes (`Llama` turns flash attention off unless asked)
            dec = StreamDecoder(
                self.path, len(part), n_ctx, threads, kv_type=KV_TYPES[self.kv_type], flash_attn=False
            )
            try:
                out.extend(greedy_rows(dec, part, max_new_tokens, done))
            finally:
                dec.close()
        return out

    def _row_done(
        self, rules: Sequence[StopRule | None], stops: Sequence[Sequence[str]]
    ) -> Callable[[int, list[int]], bool]:
        """`greedy_rows`'s `done`: the row's text holds a stop string, or its rule holds for the text before it."""

        def done(row: int, ids: list[int]) -> bool:
            if rules[row] is None and not stops[row]:
                return False
            text = self.detokenize(ids)
            cut = _cut_at(text, stops[row])
            return cut != text or (rules[row] is not None and rules[row](cut))

        return done


def _cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of the stop strings it holds (as llama-cpp-python's completion cuts it)."""
    cuts = [i for s in stops if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text
