"""Verdicts of generated text (`edit2deploy.verdicts`): whole-word mentions after normalisation, aliases, order."""

from __future__ import annotations

import random

import pytest

from edit2deploy.verdicts import Verdict, mentions, settled, verdict, words


def test_words_normalise_case_width_punctuation_and_spaces():
    assert words("  The  EIFFEL-Tower, in ＲＯＭＥ!\n") == ["the", "eiffel", "tower", "in", "rome"]
    assert words("Straße") == words("STRASSE")  # case folding, not lower()
    assert words("U.S.") == ["u", "s"]


@pytest.mark.parametrize(
    ("text", "answer", "aliases", "expected"),
    [
        ("It is in Rome.", "Rome", (), True),
        ("It is in rome", "Rome", (), True),
        ("Romeo and Juliet", "Rome", (), False),  # whole words only
        ("in ancient Romes", "Rome", (), False),
        ("It is in Roma", "Rome", ("Roma",), True),
        ("the University of Michigan", "University of Michigan", (), True),
        ("the university, of  Michigan", "University of Michigan", (), True),
        ("University of Michigan State", "Michigan State University", (), False),
        ("Ｒｏｍｅ", "Rome", (), True),  # full-width letters read as ASCII (NFKC)
        ("", "Rome", (), False),
    ],
)
def test_mentions(text, answer, aliases, expected):
    assert mentions(text, answer, aliases) is expected


def test_verdict_order_and_aliases():
    assert verdict("Mount Fuji is in Brazil.", "Brazil", "Japan") is Verdict.NEW
    assert verdict("Mount Fuji is in Japan, not Brazil.", "Brazil", "Japan") is Verdict.OLD
    assert verdict("It is in Brazil, not in Japan.", "Brazil", "Japan") is Verdict.NEW  # old only after new
    assert verdict("It is a mountain.", "Brazil", "Japan") is Verdict.NEITHER
    assert verdict("It is in Nippon.", "Brazil", "Japan", old_aliases=("Nippon",)) is Verdict.OLD
    assert verdict("Ask in Brasil.", "Brazil", "Japan", new_aliases=("Brasil",)) is Verdict.NEW
    assert verdict("It is in Brazil.", "Brazil", None) is Verdict.NEW  # no old answer
    assert verdict("It is in Japan.", "Brazil", None) is Verdict.NEITHER


def test_verdict_tie_goes_to_the_longer_answer():
    # both start at the same word: the more specific answer is the one mentioned
    assert verdict("New York City is big", "New York City", "New York") is Verdict.NEW
    assert verdict("New York City is big", "New York", "New York City") is Verdict.OLD
    assert verdict("the University of Michigan", "University of Michigan", "Michigan") is Verdict.NEW


def test_words_restating_the_subject_are_not_answers():
    # the old answer is part of the subject: a reply that restates the subject does not name it
    assert verdict("BMW 326 is produced by Sony.", "Sony", "BMW", subject="BMW 326") is Verdict.NEW
    assert verdict("The BMW 326, made by BMW.", "Sony", "BMW", subject="BMW 326") is Verdict.OLD
    assert verdict("BMW 326 is a car.", "Sony", "BMW", subject="BMW 326") is Verdict.NEITHER
    assert verdict("BMW 326 is produced by Sony.", "Sony", "BMW") is Verdict.OLD  # no subject given
    # the subject's words count only as a whole phrase
    assert verdict("BMW makes it; Sony sells it", "Sony", "BMW", subject="BMW 326") is Verdict.OLD


def test_settled_waits_for_finished_words_past_the_first_mention():
    """A verdict is settled once the answer's word is finished and enough words follow it that no phrase still being
    written (here the two-word subject) could start at or before it."""
    args = ("Rome", "Paris", (), (), "Eiffel Tower")
    assert not settled("It is in Rom", *args)
    assert not settled("It is in Rome", *args)  # "Rome" may still become "Romeo"
    assert not settled(
        "It is in Rome, a", *args
    )  # "a" unfinished: one finished word after Rome is not enough
    assert settled("It is in Rome, a c", *args)  # "a" finished: a later two-word phrase starts after Rome
    assert settled("Paris, of course. The", *args)  # the old answer settles the same way
    assert not settled("It is a tower in a city of the", *args)  # no answer yet: neither is never settled
    assert not settled("New", "New York", "York") and not settled("New York", "New York", "York")
    assert settled("New York is big", "New York", "York")


def test_a_settled_verdict_is_the_verdict_of_every_longer_text():
    """The property early stopping relies on: once a prefix of a text is settled, every longer prefix (and the
    whole text) has the same verdict — over many random texts mixing answer words, their parts and the subject."""
    rng = random.Random(0)
    vocab = ["new", "york", "city", "paris", "hilton", "rome", "romeo", "the", "is", "in", ",", ".", " "]
    cases = [
        ("New York", "York", ("NYC",), (), "Paris Hilton"),
        ("Rome", "Paris", (), ("Paris city",), None),  # "rome" may grow into "romeo"
        ("York", "New York City", (), (), None),  # an earlier-starting answer completed later
        ("Paris", "Rome", (), (), "Paris Hilton"),  # a mention the subject, completed later, covers
    ]
    checked = 0
    for _ in range(600):
        text = "".join(rng.choice(vocab) + rng.choice(["", " ", " "]) for _ in range(rng.randint(1, 14)))
        for case in cases:
            final = verdict(text, *case)
            for k in range(len(text) + 1):
                if settled(text[:k], *case):
                    assert all(verdict(text[:j], *case) == final for j in range(k, len(text) + 1)), (text, k)
                    checked += 1
                    break
    assert checked > 300  # the property was exercised, not vacuous
