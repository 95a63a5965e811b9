"""BLEU, ROUGE and the normalisation options against hand-computed values; the error analysis
(failure kinds, groups, regressions) on hand-made answers."""

from __future__ import annotations

import math

import pytest

from tunesmith.evaluate import analysis
from tunesmith.evaluate.compare import generation_scores
from tunesmith.evaluate.metrics import bleu, exact_match, normalize, rouge, sentence_bleu


def test_corpus_bleu_by_hand():
    # "the cat sat on mat" vs "the cat sat on the mat": n-gram precisions 5/5, 3/4, 2/3, 1/2;
    # brevity penalty exp(1 - 6/5)
    assert bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(
        100 * math.exp(-0.2) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # a second row "hello world" (exact) adds its counts: 7/7, 4/5, 2/3, 1/2; lengths 7 vs 8
    assert bleu(["the cat sat on mat", "hello world"], ["the cat sat on the mat", "hello world"]) == pytest.approx(
        100 * math.exp(1 - 8 / 7) * (1 * 4 / 5 * 2 / 3 * 1 / 2) ** 0.25)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert bleu(["x y z w"], ["a b c d"]) == 0.0


def test_sentence_bleu_of_an_exact_single_word_is_100():
    assert sentence_bleu("Paris", "Paris") == pytest.approx(100.0)


def test_rouge_by_hand():
    scores = rouge("the cat sat on mat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))  # 5 shared words: P 5/5, R 5/6
    assert scores["rouge2"] == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))  # 3 shared bigrams of 4 / 5
    assert scores["rougeL"] == pytest.approx(10 / 11)  # LCS "the cat sat on mat" = 5 words
    assert rouge("something else", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_counts_words_of_any_script():
    """rouge-score's own tokenizer drops non-ASCII letters, which would score every such answer 0."""
    assert rouge("Café crème", "café crème") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge("東京 大阪", "東京 京都")["rouge1"] == pytest.approx(0.5)


def test_rouge_equals_rouge_score_on_many_answers():
    """Our ROUGE against rouge-score's (the reference implementation, given the same words): random
    answers over a small vocabulary (repeats, reorderings), empty ones, one-word ones, long ones."""
    import random

    from rouge_score import rouge_scorer

    from tunesmith.evaluate.metrics import rouge_words

    class Words:
        def tokenize(self, text):
            return rouge_words(text)

    reference = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Words())
    rng = random.Random(0)
    vocabulary = ["the", "a", "cat", "dog", "sat", "on", "mat", "2021", "03", "05", "paris", "é", "東京"]
    texts = ["", "   ", "word", "the the the", "Paris, France!"] + [
        " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(600)] + [(t, t) for t in texts[:20]]
    for prediction, answer in pairs:
        expected = {name: score.fmeasure for name, score in reference.score(answer, prediction).items()}
        assert rouge(prediction, answer) == pytest.approx(expected, abs=1e-12), (prediction, answer)


@pytest.mark.parametrize("steps, expected", [
    (True, "hello world"),
    (["case"], "hello,  world!"),
    (["punctuation"], "Hello   World"),
    (["whitespace"], "Hello, World!"),
    (["case", "whitespace"], "hello, world!"),
    ([], "Hello,  World!"),
])
def test_normalisation_steps(steps, expected):
    assert normalize("  Hello,  World! ", steps) == expected


def test_exact_match_with_chosen_normalisation():
    assert exact_match("Hello  world", "hello world", ["case"]) == 0.0
    assert exact_match("Hello  world", "hello world", ["case", "whitespace"]) == 1.0
    assert exact_match("Hello, world", "hello world", ["case", "whitespace"]) == 0.0


def test_generation_scores_normalise_before_bleu_and_rouge():
    rows = [{"reference": "Paris"}, {"reference": "light blue"}]
    plain = generation_scores(["PARIS", "light blue"], rows, normalized=False)
    assert plain["exact_match"] == 0.5 and plain["rouge1"] == 1.0  # ROUGE ignores case by itself
    normalized = generation_scores(["PARIS", "light blue"], rows, normalized=True)
    assert normalized["exact_match"] == 1.0
    assert normalized["bleu"] == pytest.approx(100.0)
    assert plain["bleu"] < 100.0


@pytest.mark.parametrize("text, shape", [
    ("2021-03-05", "one token like 9-9-9"),
    ("Paris", "one token like a"),
    ("March 5, 2021", "a few words"),
    ("The capital of France is Paris, of course.", "a sentence or more"),
    ('{"city": "Paris"}', "JSON"),
    ("42", "number"),
    ("Yes.", "yes/no"),
    ("- one\n- two", "list"),
    ("", "empty"),
])
def test_shapes(text, shape):
    assert analysis.shape(text) == shape


@pytest.mark.parametrize("answer, hit_limit, kind", [
    ("", False, "empty"),
    ("2021-03-0", True, "truncated"),
    ("March 5, 2021", False, "wrong format"),
    ("The date is 2021-03-05.", False, "wrong format"),
    ("2021-03-06", False, "wrong content"),
])
def test_failure_kinds(answer, hit_limit, kind):
    assert analysis.failure_kind(answer, "2021-03-05", hit_limit) == kind


def _row(question: str, reference: str, task: str) -> dict:
    return {"where": f"d.jsonl:{question}", "messages": [{"role": "user", "content": question}],
            "reference": reference, "extra": {"task": task}}


ROWS = [_row("q1", "2021-03-05", "dates"), _row("q2", "1999-12-31", "dates"), _row("q3", "Paris", "capitals"),
        _row("q4", "Rome", "capitals"), _row("q5", "the quick brown fox jumps over the lazy dog again and again "
                                               "until the sun goes down", "capitals")]
ANSWERS = {"base": ["March 5, 2021", "1999-12-31", "Paris", "", "no idea"],
           "tuned": ["2021-03-05", "1999-12-30", "Lyon", "Rome", "the quick brown fox"]}


def test_error_analysis_groups_kinds_and_regressions():
    found = analysis.analyse(ROWS, ANSWERS, {"tuned": {4}}, normalized=False, examples=1)
    assert found["group_field"] == "task"  # found among the row's other fields
    assert found["kinds"]["base"] == {"correct": 2, "empty": 1, "truncated": 0, "wrong format": 2,
                                      "wrong content": 0}
    assert found["kinds"]["tuned"] == {"correct": 2, "empty": 0, "truncated": 1, "wrong format": 0,
                                       "wrong content": 2}
    by_task = {g["group"]: g for g in found["groups"]["by task"]}
    assert by_task["dates"]["n"] == 2 and by_task["dates"]["base_exact_match"] == 0.5
    assert by_task["dates"]["tuned_exact_match"] == 0.5
    assert by_task["capitals"]["tuned_exact_match"] == pytest.approx(1 / 3)
    assert by_task["capitals"]["kinds"] == {"wrong content": 1, "truncated": 1}
    assert [e["row"] for e in by_task["capitals"]["examples"]] == [2]  # examples=1
    by_length = {g["group"]: g["n"] for g in found["groups"]["by reference length"]}
    assert by_length == {"1-3 words": 4, "16+ words": 1}
    assert [r["row"] for r in found["regressions"]] == [1, 2]  # right before, wrong after
    assert [r["row"] for r in found["improvements"]] == [0, 3]
    regression = found["regressions"][1]
    assert (regression["base"], regression["tuned"], regression["tuned_kind"]) == ("Paris", "Lyon", "wrong content")
    assert found["examples_by_kind"]["truncated"][0]["answer"] == "the quick brown fox"


def test_error_analysis_markdown_and_summary():
    found = analysis.analyse(ROWS, ANSWERS, {"tuned": {4}}, normalized=False)
    text = analysis.markdown(found)
    assert "| wrong format | 2 | 0 |" in text
    assert "## Failures by task" in text and "## Regressions: right before fine-tuning, wrong after (2)" in text
    assert "- row 2: q3 → expected Paris; base: Paris (right); tuned: Lyon (wrong content)" in text
    lines = analysis.summary_lines(found)
    assert lines[0] == "base: 3 of 5 answers wrong (1 empty, 2 wrong format)"
    assert lines[2].startswith("Regressions (right before fine-tuning, wrong after): 2; improvements")
    assert "Weakest group by task: capitals (3 rows, exact match 33%)" in lines


def test_group_by_a_named_field_and_fallback_to_length():
    assert analysis.analyse(ROWS, ANSWERS, {}, False, group_by="task")["group_field"] == "task"
    missing = analysis.analyse(ROWS, ANSWERS, {}, False, group_by="topic")
    assert missing["group_field"] is None and "no test row has that field" in missing["note"]
    plain = [dict(row, extra={}) for row in ROWS]
    assert list(analysis.analyse(plain, ANSWERS, {}, False)["groups"]) == ["by reference length"]
