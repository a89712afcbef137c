"""Scoring helpers shared by verify and run: the held-out perplexity text, and `CachedScorer`, which remembers the
scores of a model or artifact on disk so a rerun whose inputs did not change opens no model at all."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ..atomic import atomic_file
from ..errors import UsageError
from ..formats import Artifact, Format
from ..formats.threads import exclusive_threads
from ..generation import StopRule
from ..models import cache_root, open_model
from ..scoring import Scored, Scorer, TorchScorer

HELDOUT_RESOURCE = "data/heldout.txt"
# 2: generated texts remembered too; 3: a checksum of the content; 4: texts keyed by their stop rule
SCORES_VERSION = 4


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


def heldout_pairs(text: str, max_pairs: int = 16) -> list[tuple[str, str]]:
    """(first sentence, rest) of each paragraph (paragraphs are separated by blank lines).

    Paragraphs of one sentence are skipped. The continuation keeps its leading space (it follows the prompt).
    """
    pairs = []
    for para in re.split(r"\n\s*\n", text.strip()):
        para = " ".join(para.split())
        m = _SENTENCE_END.search(para)
        if not m:
            continue
        first, rest = para[: m.start()].rstrip(), para[m.start() :]
        first += para[m.start() : m.end()].rstrip()  # a closing quote/bracket belongs to the sentence
        rest = " " + para[m.end() :].strip()
        if first.strip() and rest.strip():
            pairs.append((first, rest))
        if len(pairs) >= max_pairs:
            break
    return pairs


@dataclasses.dataclass(frozen=True)
class HeldOut:
    source: str  # "package:edit2deploy/data/heldout.txt" or a file path
    pairs: tuple[tuple[str, str], ...]


def load_heldout(path: str | Path | None = None) -> HeldOut:
    """The perplexity probe: a file's paragraphs, or (default) the public-domain passage shipped in the package."""
    if path is None:
        text = importlib.resources.files("edit2deploy").joinpath(HELDOUT_RESOURCE).read_text(encoding="utf-8")
        source = f"package:edit2deploy/{HELDOUT_RESOURCE}"
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--heldout {p}: file not found")
        text, source = p.read_text(encoding="utf-8", errors="replace"), str(p)
    pairs = heldout_pairs(text)
    if not pairs:
        raise UsageError(f"--heldout {source}: no paragraph with two or more sentences")
    return HeldOut(source, tuple(pairs))


def _text_key(kind: str, item: object, n: int, until: StopRule | None) -> str | None:
    """The cache key of a generated text; None for a stop rule that is not a dataclass value."""
    if until is None:
        return json.dumps([kind, item, n])
    if not dataclasses.is_dataclass(until):
        return None
    return json.dumps([kind, item, n, dataclasses.asdict(until)])


class OpenSlot:
    """Scorers sharing a slot hold at most one model open between them: opening one closes the other (its scores
    are kept, and it reopens when asked something new). Verify of a model that fits memory once but not three
    times (edited reference, unedited reference, artifact) then loads one runtime at a time."""

    def __init__(self) -> None:
        self.holder: CachedScorer | None = None
        self.opens = 0

    def take(self, scorer: CachedScorer) -> None:
        if self.holder is not None and self.holder is not scorer:
            self.holder.close()
        self.holder = scorer
        self.opens += 1


class CachedScorer:
    """A `Scorer` (and `TextGenerator`) that remembers scores per (prompt, continuation) and generated texts per
    (prompt or conversation, length), optionally on disk, and opens the real scorer (`factory()`) only when
    something is not remembered yet.

    The fp32 references are scored once however many targets compare against them, and a rerun whose models and
    artifacts did not change scores nothing at all. `key` names what is being scored (weights fingerprint, or an
    artifact's record, size and mtime); it is stored with the scores and checked on load.
    """

    name = "cached"

    def __init__(
        self,
        factory: Callable[[], Scorer],
        store: Path | None = None,
        key: dict | None = None,
        slot: OpenSlot | None = None,
    ):
        self._factory = factory
        self._inner: Scorer | None = None
        self.slot = slot
        self.store = store
        self.key = jsonable(key or {})
        self._memo: dict[tuple[str, str], Scored] = {}
        self._texts: dict[str, str | None] = {}  # json [kind, prompt or messages, max_new_tokens] -> text
        self._dirty = False
        self.hits = self.misses = 0
        if store is not None:
            self._load()

    @property
    def inner(self) -> Scorer:
        if self._inner is None:
            if self.slot is not None:
                self.slot.take(self)
            self._inner = self._factory()
        return self._inner

    @property
    def opened(self) -> bool:
        return self._inner is not None

    def tokenize(self, prompt: str, continuation: str):
        return self.inner.tokenize(prompt, continuation)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        todo = [p for p in dict.fromkeys(tuple(p) for p in pairs) if p not in self._memo]
        self.misses += len(todo)
        self.hits += len(pairs) - len(todo)
        if todo:
            self._memo.update(zip(todo, self.inner.score(todo)))
            self._dirty = True
        return [self._memo[tuple(p)] for p in pairs]

    def _generated_many(
        self, kind: str, items: list, n: int, until: Sequence[StopRule | None] | None = None
    ) -> list:
        """Generated texts, remembered per (kind, prompt or conversation, length, stop rule). A stop rule that is not a
        value (`generation.Settled` is one) cannot be remembered: such an item is generated every time."""
        until = list(until) if until is not None else [None] * len(items)
        keys = [_text_key(kind, item, n, u) for item, u in zip(items, until, strict=True)]
        todo = [i for i, k in enumerate(keys) if k is None or k not in self._texts]
        if not todo:
            return [self._texts[k] for k in keys]
        many = getattr(self.inner, f"{kind}_many", None)
        asked, rules = [items[i] for i in todo], [until[i] for i in todo]
        got = (
            many(asked, n, rules)
            if many
            else [getattr(self.inner, kind)(item, n, u) for item, u in zip(asked, rules, strict=True)]
        )
        fresh = dict(zip(todo, got, strict=True))
        self._texts.update({keys[i]: g for i, g in fresh.items() if keys[i] is not None})
        self._dirty = True
        return [fresh[i] if i in fresh else self._texts[k] for i, k in enumerate(keys)]

    def complete_many(
        self, prompts: Sequence[str], max_new_tokens: int, until: Sequence[StopRule | None] | None = None
    ) -> list[str]:
        return self._generated_many("complete", list(prompts), max_new_tokens, until)

    def chat_many(
        self,
        conversations: Sequence[list[dict[str, str]]],
        max_new_tokens: int,
        until: Sequence[StopRule | None] | None = None,
    ) -> list[str | None]:
        return self._generated_many("chat", list(conversations), max_new_tokens, until)

    def complete(self, prompt: str, max_new_tokens: int, until: StopRule | None = None) -> str:
        return self._generated_many("complete", [prompt], max_new_tokens, [until])[0]

    def chat(
        self, messages: list[dict[str, str]], max_new_tokens: int, until: StopRule | None = None
    ) -> str | None:
        return self._generated_many("chat", [messages], max_new_tokens, [until])[0]

    def _load(self) -> None:
        if not self.store.is_file():
            return
        try:
            doc = json.loads(self.store.read_text())
            if doc.get("version") != SCORES_VERSION or doc.get("key") != self.key:
                return  # another version or another model: not damage, just not ours
            if doc.get("sha256") != _payload_sha256(doc["scores"], doc["texts"]):
                raise ValueError("checksum mismatch")
            for prompt, cont, s in doc["scores"]:
                self._memo[(prompt, cont)] = Scored(
                    tuple(s["prompt_ids"]),
                    tuple(s["target_ids"]),
                    tuple(s["logprobs"]),
                    tuple(s["greedy_ids"]),
                )
            self._texts.update({k: v for k, v in doc["texts"]})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"scores cache {self.store} is corrupt ({exc}); scoring again", stacklevel=2)
            self._memo.clear()
            self._texts.clear()

    def save(self) -> None:
        if self.store is None or not self._dirty:
            return
        doc = {
            "version": SCORES_VERSION,
            "key": self.key,
            "scores": [
                [
                    p,
                    c,
                    {
                        "prompt_ids": list(s.prompt_ids),
                        "target_ids": list(s.target_ids),
                        "logprobs": list(s.logprobs),
                        "greedy_ids": list(s.greedy_ids),
                    },
                ]
                for (p, c), s in self._memo.items()
            ],
            "texts": [[k, v] for k, v in self._texts.items()],
        }
        doc["sha256"] = _payload_sha256(doc["scores"], doc["texts"])
        with atomic_file(self.store, "w") as fh:
            json.dump(doc, fh)
        self._dirty = False

    def close(self) -> None:
        self.save()
        if self.slot is not None and self.slot.holder is self:
            self.slot.holder = None
        inner, self._inner = self._inner, None
        close = getattr(inner, "close", None)
        if close is not None:
            close()


def _payload_sha256(scores: list, texts: list) -> str:
    """Checksum of a scores file's content: a changed byte that still parses must not become a score."""
    return hashlib.sha256(json.dumps([scores, texts], sort_keys=True).encode()).hexdigest()


def scores_store(kind: str, key: dict) -> Path:
    """Where the scores of one model/artifact are remembered (under the user cache dir)."""

    digest = hashlib.sha256(json.dumps(jsonable(key), sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "scores" / f"{kind}-{digest}.json"


def file_identity(path: Path) -> dict:
    """What identifies the bytes of an artifact without hashing them: path, size and mtime of every file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {
        "path": str(path.resolve()),
        "files": [
            [str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns]
            for f in files
        ],
    }


def torch_factory(
    model_dir: Path, device: str, device_map: str | None = None, max_memory: dict | str | None = None
) -> Callable[[], Scorer]:
    """Opens the model when first scored; `device_map`/`max_memory` as `models.open_model`'s."""

    def make() -> Scorer:
        lm = open_model(model_dir, device=device, device_map=device_map, max_memory=max_memory)
        return TorchScorer(lm.model, lm.tokenizer)

    return make


def artifact_factory(fmt: Format, art: Artifact) -> Callable[[], Scorer]:
    """Opens the artifact's runtime with every usable core: while verify uses it, it is the only work running."""
    return lambda: fmt.scorer(art, threads=exclusive_threads())


def jsonable(obj):
    """`obj` as it reads back from JSON (tuples become lists), so records compare equal to what was stored."""
    return json.loads(json.dumps(obj))
