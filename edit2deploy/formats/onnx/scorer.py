"""`edit2deploy.scoring.Scorer` in ONNX runtimes: score an ONNX export in the runtime that deploys it.

- `GenAIScorer`: onnxruntime-genai (`og.Model`, `og.Tokenizer`, `og.Generator`), for directories with a
  `genai_config.json` (the model builder's output). Teacher forcing: the prompt and the continuation (minus its
  last token) are appended with `append_tokens`, and `get_output("logits")` gives the logits of every appended
  position. Pairs are scored in lexicographic order of their ids and the generator is rewound (`rewind_to`) only
  to the longest common prefix with what it evaluated last, so continuations of one prompt share the prompt's
  evaluation. `max_length` is set to the longest sequence of the call (the KV buffer is that long, not the model's
  context length). Tokenization is onnxruntime-genai's own (`og.Tokenizer`, i.e. the deployed one): the prompt
  with the tokenizer's special tokens, the continuation with them stripped.
- `OrtScorer`: a plain `onnxruntime.InferenceSession`, batched, right padding (the builder's
  GroupQueryAttention derives positions from the mask, so left padding is wrong there). Works for the torch
  fallback export (inputs `input_ids`, `attention_mask` -> `logits`) and for builder output (empty
  `past_key_values.*` inputs are fed). Tokenization is the Hugging Face tokenizer saved in the directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edit2deploy.errors import UsageError
from edit2deploy.models import read_chat_template
from edit2deploy.scoring import Scored, pad_id, scored_from_logits

from ..threads import shared_threads

if TYPE_CHECKING:
    from edit2deploy.generation import StopRule

GENAI_CONFIG = "genai_config.json"
PROVIDERS = ("cpu", "cuda")


def _check_pair(prompt: str, continuation: str, p_ids: list[int], c_ids: list[int]) -> None:
    if not p_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
    if not c_ids:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing")


def require_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise UsageError(
            "scoring an ONNX export needs onnxruntime-genai: pip install 'onnxruntime-genai>=0.18' "
            "(or the edit2deploy[onnx] extra)"
        ) from exc
    return og


def genai_config(model_dir: Path | str, provider: str = "cpu", threads: int | None = None):
    """An `og.Config` for a builder directory, on `provider`, with `threads` intra-op threads."""
    og = require_genai()
    model_dir = Path(model_dir)
    if not (model_dir / GENAI_CONFIG).is_file():
        raise UsageError(f"{model_dir}: no {GENAI_CONFIG} (not an onnxruntime-genai model directory)")
    if provider not in PROVIDERS:
        raise UsageError(f"execution provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
    cfg = og.Config(str(model_dir))
    cfg.clear_providers()
    if provider != "cpu":
        cfg.append_provider(provider)
    n = threads or shared_threads()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": n}}}}))
    return cfg


class GenAIScorer:
    """Scores an onnxruntime-genai model directory (the model builder's output)."""

    name = "onnxruntime-genai"

    def __init__(
        self,
        model_dir: Path | str,
        provider: str = "cpu",
        threads: int | None = None,
        prompt_prefix: Sequence[int] | None = None,
    ):
        """`prompt_prefix`: ids to put before a prompt whose encoding lacks them (the BOS the Hugging Face
        tokenizer adds and onnxruntime-genai's does not; see `onnx.tokenizer_report`)."""
        og = require_genai()
        self.prompt_prefix = [int(x) for x in prompt_prefix or ()]
        self.og = og
        self.model_dir = Path(model_dir)
        self.provider = provider
        try:
            self.model = og.Model(genai_config(self.model_dir, provider, threads))
        except (RuntimeError, OSError) as exc:
            raise UsageError(f"{self.model_dir}: onnxruntime-genai cannot load the model ({exc})") from exc
        self.tokenizer = og.Tokenizer(self.model)
        # What encoding adds around any text (e.g. BOS): kept on prompts, stripped from continuations.
        empty = [int(x) for x in self.tokenizer.encode("")]
        self._special_prefix = empty

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def tokenize(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        p_ids = self.encode(prompt)
        pre_p = self.prompt_prefix
        if pre_p and p_ids[: len(pre_p)] != pre_p:
            p_ids = pre_p + p_ids
        c_ids = self.encode(continuation)
        pre = self._special_prefix
        if pre and c_ids[: len(pre)] == pre:
            c_ids = c_ids[len(pre) :]
        _check_pair(prompt, continuation, p_ids, c_ids)
        return p_ids, c_ids

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one sequence, shape (len(ids), vocab), float32."""
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(len(ids), -1)

    def _greedy(self, ids: Sequence[int], max_new_tokens: int, until: StopRule | None = None) -> str:
        """The greedy continuation of `ids`, ended at end of generation, its length, or once `until` holds."""
        gen = self._generator(len(ids) + max_new_tokens)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        eos = {int(t) for t in np.atleast_1d(self.tokenizer.eos_token_ids)}
        out: list[int] = []
        while len(out) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if until is not None and until(self.decode([t for t in out if t not in eos])):
                break
        return self.decode([t for t in out if t not in eos])

    def complete(self, prompt: str, max_new_tokens: int, until: StopRule | None = None) -> str:
        """Greedy plain-text continuation (the prompt encoded as scored)."""
        ids = self.encode(prompt)
        if self.prompt_prefix and ids[: len(self.prompt_prefix)] != self.prompt_prefix:
            ids = self.prompt_prefix + ids
        return self._greedy(ids, max_new_tokens, until)

    def chat(
        self, messages: list[dict[str, str]], max_new_tokens: int, until: StopRule | None = None
    ) -> str | None:
        """Greedy reply through the chat template onnxruntime-genai reads from the model directory; None when the
        directory's tokenizer has none."""
        template = read_chat_template(self.model_dir)
        if template is None:
            return None
        text = self.tokenizer.apply_chat_template(
            json.dumps(messages), template_str=template, add_generation_prompt=True
        )
        return self._greedy(self.encode(text), max_new_tokens, until)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length)
        return self.og.Generator(self.model, params)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        if not pairs:
            return []
        tokenized = [self.tokenize(p, c) for p, c in pairs]
        seqs = [p + c[:-1] for p, c in tokenized]
        order = sorted(range(len(pairs)), key=lambda i: seqs[i])
        gen = self._generator(max(len(s) for s in seqs) + 1)
        cur: list[int] = []  # tokens the generator holds
        rows: list[np.ndarray] = []  # logits row of each of them
        out: list[Scored | None] = [None] * len(pairs)
        for i in order:
            seq = seqs[i]
            common = 0
            for a, b in zip(cur, seq, strict=False):
                if a != b:
                    break
                common += 1
            if common < len(cur):
                if common == 0:
                    gen = self._generator(max(len(s) for s in seqs) + 1)
                else:
                    gen.rewind_to(common)
                del cur[common:], rows[common:]
            new = seq[len(cur) :]
            if new:
                gen.append_tokens(np.asarray(new, dtype=np.int32))
                lo = np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(len(new), -1)
                cur.extend(new)
                rows.extend(lo)
            p_ids, c_ids = tokenized[i]
            first = len(p_ids) - 1
            out[i] = scored_from_logits(p_ids, c_ids, np.stack(rows[first : first + len(c_ids)]))
        return out  # type: ignore[return-value]


class OrtScorer:
    """Scores an ONNX model (`model.onnx` + tokenizer files) in a plain onnxruntime session, batched."""

    name = "onnxruntime"

    def __init__(
        self,
        model_dir: Path | str,
        provider: str = "cpu",
        threads: int | None = None,
        batch_size: int = 16,
        filename: str = "model.onnx",
        tokenizer: Any = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UsageError("scoring an ONNX export needs onnxruntime: pip install onnxruntime") from exc
        self.model_dir = Path(model_dir)
        path = self.model_dir / filename
        if not path.is_file():
            raise UsageError(f"{path}: ONNX model not found")
        if provider not in PROVIDERS:
            raise UsageError(f"execution provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or shared_threads()
        so.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"] if provider == "cpu" else ["CUDAExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise UsageError(
                "CUDA was asked for but onnxruntime fell back to CPU (is onnxruntime-gpu installed?)"
            )
        self.batch_size = batch_size
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self.pad_id = pad_id(tokenizer)
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(self._inputs)
        if missing:
            raise UsageError(
                f"{path}: expected inputs input_ids and attention_mask (missing {sorted(missing)})"
            )

    def tokenize(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        from edit2deploy.scoring import hf_tokenize

        return hf_tokenize(self.tokenizer, prompt, continuation)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _greedy(self, ids: Sequence[int], max_new_tokens: int, until: StopRule | None = None) -> str:
        ids, out = list(ids), []
        eos = self.tokenizer.eos_token_id
        # no KV cache in this graph: the whole sequence each step (short texts)
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.logits(ids)[-1]))
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
            if until is not None and until(self.tokenizer.decode(out, skip_special_tokens=True)):
                break
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def complete(self, prompt: str, max_new_tokens: int, until: StopRule | None = None) -> str:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self._greedy(ids, max_new_tokens, until)

    def chat(
        self, messages: list[dict[str, str]], max_new_tokens: int, until: StopRule | None = None
    ) -> str | None:
        """Greedy reply through the tokenizer's chat template; None without one."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._greedy(ids, max_new_tokens, until)

    def _feed(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for name, info in self._inputs.items():
            int_type = np.int32 if info.type == "tensor(int32)" else np.int64
            if name == "input_ids":
                feed[name] = ids.astype(int_type)
            elif name == "attention_mask":
                feed[name] = mask.astype(int_type)
            elif name == "position_ids":
                feed[name] = np.clip(mask.cumsum(-1) - 1, 0, None).astype(int_type)
            elif name.startswith("past_key_values"):
                # empty cache: [batch, kv_heads, 0, head_size]
                shape = [ids.shape[0], self._kv_dim(info.shape[1], "num_key_value_heads"), 0]
                shape.append(self._kv_dim(info.shape[3], "head_size"))
                dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(
                    info.type, np.float32
                )
                feed[name] = np.zeros(shape, dtype=dtype)
            else:
                raise UsageError(f"{self.model_dir}: unexpected model input '{name}'")
        return feed

    def _kv_dim(self, dim: Any, key: str) -> int:
        """A KV-cache dimension: fixed in the graph, or from genai_config.json's decoder section."""
        if isinstance(dim, int):
            return dim
        cfg_path = self.model_dir / GENAI_CONFIG
        if cfg_path.is_file():
            decoder = json.loads(cfg_path.read_text()).get("model", {}).get("decoder", {})
            if isinstance(decoder.get(key), int):
                return int(decoder[key])
        raise UsageError(f"{self.model_dir}: cannot size the empty KV-cache input ({key} is '{dim}')")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray([list(ids)], dtype=np.int64)
        out = self.session.run(["logits"], self._feed(arr, np.ones_like(arr)))[0]
        return np.asarray(out[0], dtype=np.float32)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        tokenized = [self.tokenize(p, c) for p, c in pairs]
        seqs = [p + c[:-1] for p, c in tokenized]
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
        out: list[Scored | None] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):  # right padding: correct for GroupQueryAttention too
                ids[row, : len(seqs[i])] = seqs[i]
                mask[row, : len(seqs[i])] = 1
            logits = self.session.run(["logits"], self._feed(ids, mask))[0]
            for row, i in enumerate(chunk):
                p_ids, c_ids = tokenized[i]
                first = len(p_ids) - 1
                out[i] = scored_from_logits(
                    p_ids, c_ids, np.asarray(logits[row, first : first + len(c_ids)], np.float32)
                )
        return out  # type: ignore[return-value]
