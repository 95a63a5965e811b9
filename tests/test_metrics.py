"""Answer metrics against hand-computed values."""

from __future__ import annotations

import pytest

from tunesmith.evaluate.metrics import exact_match, normalize, token_f1


@pytest.mark.parametrize("prediction, reference, strict, normalized", [
    ("Paris", "Paris", 1.0, 1.0),
    ("  Paris\n", "Paris", 1.0, 1.0),  # surrounding whitespace never counts
    ("paris", "Paris", 0.0, 1.0),  # case only counts when not normalized
    ("Paris.", "Paris", 0.0, 1.0),  # punctuation likewise
    ("The  capital is   Paris!", "the capital is paris", 0.0, 1.0),
    ("Paris, France", "Paris", 0.0, 0.0),
    ("2021-03-05", "2021-03-05", 1.0, 1.0),
    ("2021-03-05", "2021-03-06", 0.0, 0.0),
    ("", "", 1.0, 1.0),
])
def test_exact_match(prediction, reference, strict, normalized):
    assert exact_match(prediction, reference) == strict
    assert exact_match(prediction, reference, normalized=True) == normalized


def test_normalize():
    assert normalize("  The Quick,  brown FOX!\n") == "the quick brown fox"
    assert normalize("2021-03-05") == "2021 03 05"


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat sat", "the cat sat down", 2 * 1.0 * 0.75 / 1.75),  # P = 3/3, R = 3/4
    ("the cat", "a dog", 0.0),
    ("a b b", "b b c", 2 / 3),  # overlap counts repeats: b, b → P = R = 2/3
    ("b b b b", "b", 2 * 0.25 * 1.0 / 1.25),  # overlap 1: P = 1/4, R = 1
    ("Paris!", "paris", 1.0),  # normalized words
    ("2021-03-05", "2021-03-06", 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # words 2021 03 05 vs 2021 03 06
    ("", "", 1.0),
    ("", "Paris", 0.0),
    ("Paris", "", 0.0),
    ("...", "Paris", 0.0),  # nothing left after normalizing
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_token_f1_is_symmetric():
    forward = token_f1("the cat sat", "the cat sat down")
    assert token_f1("the cat sat down", "the cat sat") == pytest.approx(forward)
