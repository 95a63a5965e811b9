"""Answer metrics against a reference: exact match, token F1, BLEU (sacrebleu), ROUGE-1/2/L
(rouge-score), with optional normalisation of case, punctuation and whitespace."""

from __future__ import annotations

import functools
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


class _WordTokenizer:
    """Words for ROUGE: Unicode letters and digits (rouge-score's own tokenizer drops non-ASCII)."""

    def tokenize(self, text: str) -> list[str]:
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


@functools.cache
def _rouge_scorer():
    """One scorer for every row: building it costs more than scoring a short answer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_WordTokenizer())


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of one answer, 0-1."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(score.fmeasure) for name, score in scores.items()}


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
