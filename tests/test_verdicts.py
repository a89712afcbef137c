"""Verdicts of generated text (`edit2deploy.verdicts`): whole-word mentions after normalisation, aliases, order."""

from __future__ import annotations

import pytest

from edit2deploy.verdicts import Verdict, mentions, verdict, words


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
