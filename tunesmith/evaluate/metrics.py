"""Answer metrics against a reference: exact match, token F1, BLEU (sacrebleu), ROUGE-1/2/L, with
optional normalisation of case, punctuation and whitespace.

ROUGE is computed here, as rouge-score computes it (n-gram and longest-common-subsequence
F-measures; tests/test_scores.py checks every score against it): rouge-score imports all of NLTK
(and through it scikit-learn and SciPy where installed) for a stemmer tunesmith does not use, 1.3 s
of every evaluation."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


NORMALIZE_STEPS = ("case", "punctuation", "whitespace")


def normalize(text: str, steps: bool | Sequence[str] = True) -> str:
    """Lower case, punctuation removed, whitespace collapsed; `steps` picks which (True: all).
    Surrounding whitespace is always dropped."""
    chosen = set(NORMALIZE_STEPS if steps is True else steps or ())
    if "case" in chosen:
        text = text.lower()
    if "punctuation" in chosen:
        text = _PUNCTUATION.sub(" ", text)
    if "whitespace" in chosen:
        text = " ".join(text.split())
    return text.strip()


def exact_match(prediction: str, reference: str, normalized: bool | Sequence[str] = False) -> float:
    return float(normalize(prediction, normalized) == normalize(reference, normalized))


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


def rouge_words(text: str) -> list[str]:
    """Words for ROUGE: Unicode letters and digits, lower case (rouge-score's own tokenizer drops
    non-ASCII letters)."""
    return re.findall(r"\w+", text.lower())


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenization, one reference each), 0-100. With effective order:
    n-gram orders that no answer is long enough to have are left out instead of making BLEU 0, so
    one-word answers that are all right score 100 (other corpora score as with plain BLEU)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU(effective_order=True).corpus_score(predictions, [references]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    """BLEU of one answer, 0-100, with sacrebleu's default exponential smoothing (per-row view)."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of one answer, 0-1."""
    predicted, expected = rouge_words(prediction), rouge_words(reference)
    scores = {}
    for n in (1, 2):
        ours, theirs = _ngrams(predicted, n), _ngrams(expected, n)
        scores[f"rouge{n}"] = _fmeasure(sum((ours & theirs).values()), sum(ours.values()), sum(theirs.values()))
    scores["rougeL"] = _fmeasure(_lcs_length(predicted, expected), len(predicted), len(expected))
    return scores


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(zip(*(words[i:] for i in range(n))))


def _fmeasure(shared: int, predicted: int, expected: int) -> float:
    precision, recall = shared / max(predicted, 1), shared / max(expected, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the dynamic-programming table at a time."""
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


# The rows of every evaluation table (results.md, the terminal, report.html), in this order
METRICS = ("preference_accuracy", "logp_margin", "test_loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL")


def table_rows(results: dict) -> list[list[str]]:
    labels = list(results)
    rows = []
    for metric in METRICS:
        if any(metric not in results[label] for label in labels):
            continue  # e.g. results saved before BLEU and ROUGE were scored
        values = [results[label][metric] for label in labels]
        row = [metric] + [f"{v:.4f}" for v in values]
        if len(values) == 2:
            row.append(f"{values[1] - values[0]:+.4f}")
        rows.append(row)
    return rows
