"""Generation probes: what a user of the deployed model sees. Each edited fact is asked in generated text, greedy:

- `completion`: the edit prompt, continued as plain text;
- `chat`: the prompt, each paraphrase and each question sent as the user message through the model's own chat
  template (a runtime whose model has no template answers None: chat is skipped and the report says so);
- `neighborhood`: each neighbourhood prompt continued as plain text, which should still mention its answer;
- `neighborhood_chat`: each neighbourhood prompt that is a question (zsRE's NQ locality questions) also sent as a
  chat message; its reply should still mention the answer, and should agree with the paired baseline's.

Each text gets a verdict (`verdicts.verdict`): new / old / neither; a neighbourhood text is kept when it mentions
its answer. The same probes run in every place verify scores (edited fp32, the artifact, unedited fp32, the
paired baseline), so generated verdicts can be compared like teacher-forced ones. Greedy text is stopped once its
verdict is settled (`verdicts.settled`: nothing the model writes next can change it), so a reply that gives an answer
early costs a few tokens, not the whole budget; a reply that gives none runs to its length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from .requests import EditRequest
from .verdicts import Verdict, settled, verdict

GEN_KINDS = ("completion", "chat", "neighborhood", "neighborhood_chat")
CHAT_KINDS = ("chat", "neighborhood_chat")  # sent through the chat template
KEPT, LOST = "kept", "lost"  # the verdicts of a neighbourhood text


# Called with the text generated so far; True stops that text there (greedy decoding: the rest is not needed).
StopRule = Callable[[str], bool]


@runtime_checkable
class TextGenerator(Protocol):
    """A runtime that generates text greedily (every scorer of a deployment format is one)."""

    def complete(self, prompt: str, max_new_tokens: int, until: StopRule | None = None) -> str:
        """The greedy continuation of `prompt` as plain text (stopped early once `until` says so)."""
        ...

    def chat(
        self, messages: list[dict[str, str]], max_new_tokens: int, until: StopRule | None = None
    ) -> str | None:
        """The greedy assistant reply through the model's own chat template; None when it has none."""
        ...


@dataclass(frozen=True)
class GenerationSettings:
    completion_tokens: int = 24
    chat_tokens: int = 48
    settle: bool = True  # stop each text once its verdict is settled (False: every text runs to its length)


DEFAULT_GENERATION = GenerationSettings()


@dataclass(frozen=True)
class GenProbe:
    request_id: str
    kind: str  # completion | chat | neighborhood | neighborhood_chat
    text: str  # the prompt, or the user message
    expected: str  # the new answer (neighbourhood: its answer)
    other: str | None = None  # the old answer
    expected_aliases: tuple[str, ...] = ()
    other_aliases: tuple[str, ...] = ()
    source: str = "prompt"  # what was asked: the edit prompt, a paraphrase, a question, a neighbour prompt
    subject: str | None = None  # the edited fact's subject: words restating it are not answers

    def until(self) -> Settled:
        """The rule that stops this probe's text once its verdict is settled."""
        return Settled(self.expected, self.other, self.expected_aliases, self.other_aliases, self.subject)


@dataclass(frozen=True)
class Settled:
    """A `StopRule`: the text's verdict between these answers is settled (`verdicts.settled`). A value, so a cache
    of generated texts can key on it."""

    new: str
    old: str | None = None
    new_aliases: tuple[str, ...] = ()
    old_aliases: tuple[str, ...] = ()
    subject: str | None = None

    def __call__(self, text: str) -> bool:
        return settled(text, self.new, self.old, self.new_aliases, self.old_aliases, self.subject)


def generation_probes(requests: Sequence[EditRequest]) -> list[GenProbe]:
    """The generation probes of the edited facts (see the module docstring)."""
    out: list[GenProbe] = []
    for r in requests:
        out.append(completion_probe(r))
        asked = {
            r.text: "prompt",
            **{p: "paraphrase" for p in r.paraphrases},
            **{q: "question" for q in r.questions},
        }
        out.extend(chat_probe(r, message, source) for message, source in asked.items())
        for n in r.neighborhood:
            kinds = (
                ("neighborhood", "neighborhood_chat")
                if n.prompt.rstrip().endswith("?")
                else ("neighborhood",)
            )
            for kind in kinds:
                out.append(
                    GenProbe(r.id, kind, n.prompt, n.answer, None, r.aliases_of(n.answer), (), "neighbour")
                )
    return out


def completion_probe(r: EditRequest) -> GenProbe:
    """The edited fact's prompt continued as plain text: the new answer expected, the old one not."""
    return GenProbe(
        r.id,
        "completion",
        r.text,
        r.target_new,
        r.target_true,
        r.aliases_of(r.target_new),
        r.aliases_of(r.target_true or ""),
        subject=r.subject,
    )


def chat_probe(r: EditRequest, message: str, source: str = "prompt") -> GenProbe:
    """`message` about the edited fact `r`, sent as a chat message: the new answer expected, the old one not."""
    return GenProbe(
        r.id,
        "chat",
        message,
        r.target_new,
        r.target_true,
        r.aliases_of(r.target_new),
        r.aliases_of(r.target_true or ""),
        source,
        r.subject,
    )


@dataclass(frozen=True)
class Generated:
    """One probe's generated text and its verdict (None: not generated, e.g. no chat template)."""

    text: str | None
    verdict: str | None


def judge(probe: GenProbe, text: str | None) -> Generated:
    if text is None:
        return Generated(None, None)
    if probe.kind.startswith("neighborhood"):
        return Generated(
            text, KEPT if verdict(text, probe.expected, None, probe.expected_aliases) == Verdict.NEW else LOST
        )
    return Generated(
        text,
        verdict(
            text, probe.expected, probe.other, probe.expected_aliases, probe.other_aliases, probe.subject
        ).value,
    )


def generate(gen: TextGenerator, probes: Sequence[GenProbe], settings: GenerationSettings) -> list[Generated]:
    """Run every probe in one runtime, greedily (batched where the runtime offers `complete_many`/`chat_many`)."""
    chats = [i for i, p in enumerate(probes) if p.kind in CHAT_KINDS]
    plain = [i for i, p in enumerate(probes) if p.kind not in CHAT_KINDS]

    def rules(idx: list[int]) -> list[StopRule | None]:
        return [probes[i].until() if settings.settle else None for i in idx]

    conversations = [[{"role": "user", "content": probes[i].text}] for i in chats]
    texts = dict(zip(chats, _each(gen, "chat", conversations, settings.chat_tokens, rules(chats))))
    prompts = [probes[i].text for i in plain]
    texts.update(zip(plain, _each(gen, "complete", prompts, settings.completion_tokens, rules(plain))))
    return [judge(p, texts[i]) for i, p in enumerate(probes)]


def _each(
    gen: TextGenerator, method: str, items: list, max_new_tokens: int, until: list[StopRule | None]
) -> list[str | None]:
    """`gen.<method>_many(items)` where the runtime batches, else one `gen.<method>(item)` at a time."""
    many = getattr(gen, f"{method}_many", None)
    if many is not None:
        return many(items, max_new_tokens, until)
    return [getattr(gen, method)(item, max_new_tokens, u) for item, u in zip(items, until, strict=True)]


@dataclass
class GenRow:
    probe: GenProbe
    by: dict[str, Generated]  # place (fp32, artifact, base_fp32, baseline) -> what it generated

    @property
    def survived(self) -> bool | None:
        a, f = self.by.get("artifact"), self.by.get("fp32")
        if a is None or f is None or a.verdict is None or f.verdict is None:
            return None
        return a.verdict == f.verdict

    def to_json(self) -> dict:
        return {
            **asdict(self.probe),
            **{f"verdict_{k}": g.verdict for k, g in self.by.items()},
            **{f"text_{k}": None if g.text is None else g.text[:120] for k, g in self.by.items()},
            "survived": self.survived,
        }


def _share(values: Sequence[bool]) -> float | None:
    return None if not values else 100.0 * sum(values) / len(values)


def generation_rates(rows: Sequence[GenRow], place: str) -> dict[str, float | None]:
    """Shares (0-100) of one place's generated verdicts: completion/chat new, chat old, neighbourhood kept."""

    def of(kind: str, want: str, source: str | None = None) -> float | None:
        got = [
            r.by[place].verdict
            for r in rows
            if r.probe.kind == kind and place in r.by and source in (None, r.probe.source)
        ]
        return _share([v == want for v in got if v is not None])

    return {
        "completion_new": of("completion", Verdict.NEW),
        "chat_prompt_new": of("chat", Verdict.NEW, "prompt"),  # the edit prompt as the user message
        "chat_new": of("chat", Verdict.NEW),  # every chat probe: prompt, paraphrases, questions
        "chat_old": of("chat", Verdict.OLD),
        "neighborhood_kept": of("neighborhood", KEPT),
        "neighborhood_chat_kept": of("neighborhood_chat", KEPT),  # None: no neighbour is a question
    }


def agreement(rows: Sequence[GenRow], kind: str, place: str, other: str) -> float | None:
    """Share (0-100) of `kind` probes whose verdict in `place` equals the one in `other` (both generated)."""
    pairs = [
        (r.by[place].verdict, r.by[other].verdict)
        for r in rows
        if r.probe.kind == kind and place in r.by and other in r.by
    ]
    return _share([a == b for a, b in pairs if a is not None and b is not None])


@dataclass
class GenerationCheck:
    """Generated verdicts of every probe in every place, their rates, and artifact-vs-fp32 survival."""

    rows: list[GenRow]
    rates: dict[str, dict[str, float | None]]  # place -> rate name -> 0-100
    survival: float | None  # share (0-1) of artifact verdicts equal to fp32's
    notes: list[str] = field(default_factory=list)
    # share (0-100) of neighbourhood chat replies of the artifact that agree with the paired baseline's (kept or lost)
    neighborhood_chat_agreement: float | None = None

    def to_json(self) -> dict:
        return {
            "rates": self.rates,
            "survival": self.survival,
            "neighborhood_chat_agreement": self.neighborhood_chat_agreement,
            "notes": list(self.notes),
            "facts": [r.to_json() for r in self.rows],
        }


def check_generation(
    requests: Sequence[EditRequest],
    places: dict[str, TextGenerator],
    settings: GenerationSettings = DEFAULT_GENERATION,
) -> GenerationCheck:
    """Run the generation probes in every place (`fp32`, `artifact`, and optionally `base_fp32`, `baseline`)."""
    probes = generation_probes(requests)
    by_place = {name: generate(gen, probes, settings) for name, gen in places.items()}
    rows = [GenRow(p, {name: got[i] for name, got in by_place.items()}) for i, p in enumerate(probes)]
    notes = [
        f"{name}: the model has no chat template; chat probes skipped"
        for name, got in by_place.items()
        if any(p.kind in CHAT_KINDS for p in probes)
        and all(g.text is None for p, g in zip(probes, got) if p.kind in CHAT_KINDS)
    ]
    flags = [r.survived for r in rows if r.survived is not None]
    return GenerationCheck(
        rows,
        {name: generation_rates(rows, name) for name in places},
        None if not flags else sum(flags) / len(flags),
        notes,
        agreement(rows, "neighborhood_chat", "artifact", "baseline"),
    )
