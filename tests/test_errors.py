"""``first_line``: an exception's message as the one line our own error quotes."""

from __future__ import annotations

import pytest

from normsurgeon.errors import first_line


class Silent(Exception):
    pass


@pytest.mark.parametrize("message,expected", [
    ("shapes cannot be multiplied\n  (2x3 and 4x5)\n", "shapes cannot be multiplied"),
    ("\n\n   \n  indented first line  \nsecond", "indented first line"),
    ("\x1b[1m\x1b[31mError:\x1b[0m bad \x1b[2Kinput", "Error: bad input"),
    ("one line", "one line"),
], ids=["multi-line", "leading blank lines", "ansi", "one line"])
def test_the_first_non_empty_line_without_colour(message: str, expected: str) -> None:
    assert first_line(RuntimeError(message)) == expected


@pytest.mark.parametrize("exc", [Silent(), RuntimeError(""), RuntimeError(" \n \n")], ids=["no args", "empty", "blank"])
def test_no_message_is_the_class_name(exc: BaseException) -> None:
    assert first_line(exc) == type(exc).__name__
    assert first_line(exc, named=True) == type(exc).__name__  # not "Silent: Silent"


def test_named_puts_the_class_first() -> None:
    assert first_line(ValueError("bad value\ndetails"), named=True) == "ValueError: bad value"


def test_a_long_line_is_cut_after_its_last_sentence_that_fits() -> None:
    sentence = "The exporter could not trace the call to this module here. "
    text = first_line(RuntimeError(sentence * 5), limit=200)
    assert text == (sentence * 3).rstrip() and len(text) <= 200


def test_a_long_sentence_is_cut_at_a_word_and_says_so() -> None:
    text = first_line(RuntimeError("word " * 100), limit=60)
    assert text.endswith("word ...") and len(text) <= 60 and "wor ..." not in text


def test_a_long_word_is_cut_at_the_limit() -> None:
    text = first_line(RuntimeError("x" * 500), limit=50)
    assert text == "x" * 46 + " ..." and len(text) == 50
