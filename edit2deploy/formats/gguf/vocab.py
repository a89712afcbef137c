"""Tokenizer metadata of a GGUF, read off a Hugging Face directory's `tokenizer.json` (+ `tokenizer_config.json`).

Two tokenizer kinds, as llama.cpp's converter writes them:
- byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen): `tokenizer.ggml.model = "gpt2"`, tokens, token types, merges,
  and the pre-tokenizer name found by hashing how the tokenizer splits a probe text (`pretok`);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1-0.3, Gemma): `"llama"`, tokens, scores
  (from merge ranks) and types.
Special ids, merges and the chat template come from `gguf.SpecialVocab`; add_bos/add_eos are probed from the
tokenizer itself, so llama.cpp adds exactly the special tokens the Hugging Face tokenizer adds.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from edit2deploy.errors import UsageError

from .pretok import pre_tokenizer_name

TT = gguf.TokenType


@dataclass
class VocabInfo:
    """What was written (tests and reports use it)."""

    model: str  # "gpt2" or "llama"
    pre: str | None
    n_tokens: int  # tokens written (config vocab size, padded)
    n_real: int  # tokens the tokenizer knows
    add_bos: bool
    add_eos: bool
    special_ids: dict[str, int]


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from exc


def _looks_special(token: str) -> bool:
    # llama.cpp converter's does_token_look_special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _tokenizer_kind(tj: dict) -> str:
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UsageError(
            f"GGUF export supports BPE tokenizers only (tokenizer.json model type is {model.get('type')!r})"
        )
    return "llama" if model.get("byte_fallback") else "gpt2"


def _add_space_prefix(tj: dict, tokenizer_config: dict) -> bool:
    if isinstance(tokenizer_config.get("add_prefix_space"), bool):
        return tokenizer_config["add_prefix_space"]
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    if '"Prepend"' in text and "\u2581" in text:
        return True
    return bool(re.search(r'"prepend_scheme":\s*"(first|always)"', text)) or bool(
        re.search(r'"add_prefix_space":\s*true', text)
    )


def _probe_add_special(tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = bos is not None and len(with_special) > len(bare) and with_special[0] == bos
    add_eos = eos is not None and len(with_special) > len(bare) and with_special[-1] == eos
    return add_bos, add_eos


def _gpt2_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and types as llama.cpp's converter (`get_vocab_base`) writes them."""
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if i in decoder and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if (i in decoder and decoder[i].special) or _looks_special(token):
                types.append(TT.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(TT.USER_DEFINED)
        else:
            types.append(TT.NORMAL)
        tokens.append(token)
    return tokens, types


def _spm_tokens(tj: dict, tokenizer, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocab from a byte-fallback BPE tokenizer.json: merge rank -> score."""
    vocab: dict[str, int] = tj["model"]["vocab"]
    merges = tj["model"].get("merges", [])
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    reverse = {i: t for t, i in vocab.items()}
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    unk = tj["model"].get("unk_token")
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    worst = -float(len(merges) + 1)
    for i in range(n_vocab):
        if i in added:
            tok = added[i]
            tokens.append(tok["content"])
            scores.append(0.0)
            special = tok.get("special") or _looks_special(tok["content"])
            types.append(
                TT.UNKNOWN if tok["content"] == unk else (TT.CONTROL if special else TT.USER_DEFINED)
            )
            continue
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            scores.append(worst)
            types.append(TT.UNUSED)
            continue
        t = reverse[i]
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else worst))
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(TT.BYTE)
        elif t == unk:
            types.append(TT.UNKNOWN)
        else:
            types.append(TT.NORMAL)
    return tokens, scores, types


def add_vocab(
    writer: gguf.GGUFWriter,
    model_dir: Path,
    vocab_size: int | None,
    truncate: bool = False,
    pre_override: str | None = None,
) -> VocabInfo:
    """Write the tokenizer metadata of `model_dir` to `writer`.

    `vocab_size`: the embedding's row count (config.vocab_size); the token list is padded to it with
    unused `[PADn]` entries, or, with `truncate` (Gemma 3), cut to the tokenizer's own size.
    `pre_override`: a llama.cpp pre-tokenizer name to use instead of the one recognised by hash (for
    tokenizers llama.cpp does not list; the caller vouches that llama.cpp splits text the same way).
    """
    from transformers import AutoTokenizer

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UsageError(
            f"{model_dir}: GGUF export needs a tokenizer.json (only a fast tokenizer can be converted)"
        )
    tj = _load_json(tj_path)
    tc_path = model_dir / "tokenizer_config.json"
    tokenizer_config = _load_json(tc_path) if tc_path.is_file() else {}
    kind = _tokenizer_kind(tj)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir}: cannot load the tokenizer ({exc})") from exc
    n_real = max(tokenizer.get_vocab().values()) + 1
    n_vocab = n_real if (truncate or vocab_size is None) else max(vocab_size, n_real)

    pre: str | None = None
    if kind == "gpt2":
        pre, chkhsh = pre_tokenizer_name(tokenizer)
        pre = pre_override or pre
        if pre is None:
            raise UsageError(
                f"{model_dir}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {chkhsh}); "
                "llama.cpp's own convert_hf_to_gguf.py would refuse it too (override: tokenizer_pre=<llama.cpp name>)"
            )
        tokens, types = _gpt2_tokens(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        tokens, scores, types = _spm_tokens(tj, tokenizer, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    writer.add_add_space_prefix(_add_space_prefix(tj, tokenizer_config))

    gguf_logger = logging.getLogger("gguf.vocab")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=(kind == "gpt2"), n_vocab=n_vocab)
    finally:
        gguf_logger.setLevel(level)
    add_bos, add_eos = _probe_add_special(
        tokenizer, special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    )
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    special.add_to_gguf(writer, quiet=True)
    return VocabInfo(
        model=kind,
        pre=pre,
        n_tokens=n_vocab,
        n_real=n_real,
        add_bos=add_bos,
        add_eos=add_eos,
        special_ids=dict(special.special_token_ids),
    )
