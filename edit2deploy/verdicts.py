"""Verdicts of generated text: does a reply give the new answer, the old one, or neither?

What a user of a deployed model sees is generated text, so an edit is judged there by mentions: an answer is
mentioned when its words appear as whole words after normalisation (Unicode NFKC, case folded, punctuation and
symbols read as spaces, whitespace collapsed), or an alias of it does.

- **new**: the new answer is mentioned and the old one is not, or only after it;
- **old**: the old answer is mentioned first;
- **neither**: otherwise.

When both start at the same word, the longer match counts (the more specific answer). Words that restate the
fact's subject are not mentions of an answer: "BMW 326 is produced by Sony" gives the new answer of "BMW 326,
produced by" (old answer BMW), since a reply that restates the question names its subject.

Greedy generation may stop as soon as a text's verdict is `settled`: what the model writes next cannot change it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from enum import StrEnum


class Verdict(StrEnum):
    NEW = "new"
    OLD = "old"
    NEITHER = "neither"


def words(text: str) -> list[str]:
    """`text` normalised into words: NFKC, case folded, every punctuation or symbol character a space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in folded)
    return kept.split()


def masked_words(text: str, masked: Sequence[str] = ()) -> list[str]:
    """`words(text)` with every whole-word occurrence of a `masked` phrase blanked (positions kept)."""
    hay = words(text)
    for phrase in masked:
        needle = words(phrase)
        n = len(needle)
        if not n:
            continue
        i = 0
        while i <= len(hay) - n:
            if hay[i : i + n] == needle:
                hay[i : i + n] = [""] * n
                i += n
            else:
                i += 1
    return hay


def first_mention(
    text: str, answer: str, aliases: Sequence[str] = (), masked: Sequence[str] = ()
) -> tuple[int, int] | None:
    """(word index, −length) of the earliest whole-word mention of `answer` or an alias outside the `masked`
    phrases; None when absent."""
    hay = masked_words(text, masked)
    best = None
    for name in (answer, *aliases):
        needle = words(name)
        if not needle:
            continue
        n = len(needle)
        at = next((i for i in range(len(hay) - n + 1) if hay[i : i + n] == needle), None)
        if at is not None and (best is None or (at, -n) < best):
            best = (at, -n)
    return best


def mentions(text: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    return first_mention(text, answer, aliases) is not None


def verdict(
    text: str,
    new: str,
    old: str | None = None,
    new_aliases: Sequence[str] = (),
    old_aliases: Sequence[str] = (),
    subject: str | None = None,
) -> Verdict:
    """The verdict of one generated text (see the module docstring); mentions inside `subject` do not count."""
    masked = (subject,) if subject else ()
    at_new = first_mention(text, new, new_aliases, masked)
    at_old = first_mention(text, old, old_aliases, masked) if old else None
    if at_old is not None and (at_new is None or at_old < at_new):
        return Verdict.OLD
    if at_new is not None:
        return Verdict.NEW
    return Verdict.NEITHER


def settled(
    text: str,
    new: str,
    old: str | None = None,
    new_aliases: Sequence[str] = (),
    old_aliases: Sequence[str] = (),
    subject: str | None = None,
) -> bool:
    """Whether no continuation of `text` can change its verdict: an answer is mentioned in its finished words (the
    last word may still grow, so it does not count) and they run on far enough past the first mention that no
    phrase completed later (an answer, an alias, the masked subject; at most `longest` words, each holding a word
    still to come) can start at or before the mention's last word. Until then, and for a verdict of neither, the
    text is not settled."""
    end = len(text)
    while end and unicodedata.category(text[end - 1])[0] not in "PSZC":
        end -= 1  # an unfinished last word: "Rome" may still become "Romeo"
    head = text[:end]
    masked = (subject,) if subject else ()
    found = [
        m
        for m in (
            first_mention(head, new, new_aliases, masked),
            first_mention(head, old, old_aliases, masked) if old else None,
        )
        if m is not None
    ]
    if not found:
        return False
    start, minus_n = min(found)
    phrases = (new, *new_aliases, *((old, *old_aliases) if old else ()), *masked)
    longest = max(len(words(p)) for p in phrases)
    # a later phrase holds a word past the finished ones, so it starts at ≥ finished − longest + 1
    return start - minus_n - 1 < len(words(head)) - longest + 1
