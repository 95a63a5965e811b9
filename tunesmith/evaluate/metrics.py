"""Answer metrics: exact match and token F1 against a reference."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str, normalized: bool = False) -> float:
    if normalized:
        return float(normalize(prediction) == normalize(reference))
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalized words."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)
