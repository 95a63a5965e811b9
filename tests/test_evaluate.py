"""Evaluation files: results.csv / results.md / predictions.jsonl, with hand-made answers, and an
evaluation of the base model alone when a run has no checkpoint yet."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from helpers import qa_rows, write_jsonl

from tunesmith.evaluate import compare

ROWS = [
    {"where": "d.jsonl:1", "messages": [{"role": "user", "content": "Capital of France?"}],
     "reference": "Paris"},
    {"where": "d.jsonl:2", "messages": [{"role": "user", "content": "Sky colour?"}],
     "reference": "light blue"},
]


def test_written_results_match_hand_computed_values(tmp_path):
    answers = {"base": ["The capital is Paris.", "blue"], "tuned": ["Paris", "light blue"]}
    results = {
        "base": {"test_loss": 2.0, "perplexity": math.exp(2.0), "exact_match": 0.0,
                 "token_f1": (2 * 0.25 / 1.25 + 2 * 0.5 / 1.5) / 2, "n_test": 2},
        "tuned": {"test_loss": 0.5, "perplexity": math.exp(0.5), "exact_match": 1.0, "token_f1": 1.0,
                  "n_test": 2},
    }
    compare.write(tmp_path, results, answers, ROWS, normalized=False)

    table = list(csv.reader((tmp_path / "results.csv").open()))
    assert table[0] == ["metric", "base", "tuned", "change"]
    assert table[1:] == [  # only the metrics given are tabled
        ["test_loss", "2.0000", "0.5000", "-1.5000"],
        ["perplexity", "7.3891", "1.6487", "-5.7403"],
        ["exact_match", "0.0000", "1.0000", "+1.0000"],
        ["token_f1", "0.5333", "1.0000", "+0.4667"],  # base: (0.4 + 2/3) / 2
    ]
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert markdown[:3] == ["| metric | base | tuned | change |", "|---|---|---|---|",
                            "| test_loss | 2.0000 | 0.5000 | -1.5000 |"]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert predictions[0] == {
        "where": "d.jsonl:1", "prompt": ROWS[0]["messages"], "reference": "Paris",
        "base": "The capital is Paris.", "base_exact_match": 0.0, "base_token_f1": pytest.approx(0.4),
        # sentence BLEU of 5 tokens (13a splits off the '.') against 1: p1 = 1/5, then sacrebleu's 'exp'
        # smoothing for the empty orders: 1/(2*4), 1/(4*3), 1/(8*2); no brevity penalty
        "base_bleu": pytest.approx(100 * (0.2 * 0.125 / 12 * 0.0625) ** 0.25),
        "base_rouge1": pytest.approx(0.4), "base_rouge2": 0.0, "base_rougeL": pytest.approx(0.4),  # P 1/4, R 1
        "base_error": "wrong format",  # a sentence where one word was wanted
        "tuned": "Paris", "tuned_exact_match": 1.0, "tuned_token_f1": 1.0, "tuned_bleu": pytest.approx(100.0),
        "tuned_rouge1": 1.0, "tuned_rouge2": 0.0, "tuned_rougeL": 1.0, "tuned_error": None,
    }
    assert predictions[1]["base_token_f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # "blue" vs "light blue"
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_evaluate_without_a_checkpoint_scores_the_base_model_only(cli, llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    run_dir = tmp_path / "run"
    result = cli("evaluate", "--model", llama, "--data.path", data, "--out_dir", run_dir,
                 "--eval.max_new_tokens", 4, "--train.device", "cpu", "--train.precision", "fp32")
    assert result.code == 0, result.err
    assert "evaluating the base model only" in result.err
    table = list(csv.reader((run_dir / "eval" / "results.csv").open()))
    assert table[0] == ["metric", "base"]
    loss = float({row[0]: row[1] for row in table[1:]}["test_loss"])
    assert 0 < loss < 20
    lines = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert len(predictions) == 1 and set(predictions[0]) == {
        "where", "prompt", "reference", "base", "base_exact_match", "base_token_f1", "base_bleu", "base_rouge1",
        "base_rouge2", "base_rougeL", "base_error"}


def test_evaluate_needs_a_test_split(cli, llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    result = cli("evaluate", "--model", llama, "--data.path", data, "--out_dir", tmp_path / "run",
                 "--data.test_split", 0)
    assert result.code == 2
    assert "the test split is empty" in result.err


def test_auto_generation_batch_holds_as_many_rows_as_their_kv_cache_fits_in_a_quarter_of_memory(llama, monkeypatch):
    from tunesmith import config as config_module
    from tunesmith import estimate
    from tunesmith.data.dataset import TokenizedSplit
    from tunesmith.infer.generate import load_base

    loaded = load_base(str(llama), device="cpu", precision="fp32")
    split = TokenizedSplit.from_lists([[5] * 10, [5] * 30, [5] * 20], [[False] * 10, [False] * 30, [False] * 20])
    model = loaded.model.config  # tiny llama: 2 layers, 2 key/value heads of 16, fp32
    per_row = 2 * model.num_hidden_layers * model.num_key_value_heads * 16 * 4 * (30 + 5)  # longest row + answer cap
    monkeypatch.setattr(estimate, "available_memory", lambda device: (4 * 2.5 * per_row, "test"))
    auto = config_module.build({"model": str(llama)})
    assert auto.eval.batch_size == "auto"
    assert compare.generation_batch(loaded, auto, split, 3, 5) == 2  # a quarter of memory: 2.5 rows
    monkeypatch.setattr(estimate, "available_memory", lambda device: (1e12, "test"))
    assert compare.generation_batch(loaded, auto, split, 3, 5) == 3  # never more than the rows
    fixed = config_module.build({"model": str(llama), "eval": {"batch_size": 7}})
    assert compare.generation_batch(loaded, fixed, split, 3, 5) == 7 and fixed.eval.fixed_batch == 7


def test_the_test_loss_is_read_in_generations_prefill_and_equals_a_plain_forward(cli, llama, tmp_path, monkeypatch):
    """No second pass over the test rows for their loss: the prefill that starts each answer reads
    the reference answer too. The mean loss per target token equals plain transformers' on the
    prepared test examples."""
    from transformers import AutoModelForCausalLM

    from tunesmith import config as config_module
    from tunesmith.data.prepare import prepare
    from tunesmith.model.load import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(60))
    args = ["--model", str(llama), "--data.path", str(data), "--out_dir", str(tmp_path / "run"),
            "--data.test_split", "0.2", "--train.device", "cpu", "--train.precision", "fp32"]
    apart: list[int] = []  # rows whose loss needed the packed pass
    packed = compare.loss_totals
    monkeypatch.setattr(compare, "loss_totals", lambda loaded, split, indices, size=8: (
        apart.extend(indices), packed(loaded, split, indices, size))[1])
    result = cli("evaluate", *args, "--eval.max_new_tokens", 4)
    assert result.code == 0, result.err
    loss = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["base"]["test_loss"]
    assert apart == []

    split = prepare(config_module.from_args(args), load_tokenizer(str(llama), quiet=True)).splits["test"]
    model = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for index in range(len(split)):
            ids, supervised = split.example(index)
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], dim=-1)
            for t in range(1, len(ids)):
                if supervised[t]:
                    total, targets = total - float(logp[t - 1, ids[t]]), targets + 1
    assert len(split) >= 10 and loss == pytest.approx(total / targets, rel=1e-5)


def test_only_rows_that_begin_with_the_generation_prompt_are_read_in_the_prefill():
    """A row whose targets start elsewhere (an earlier turn) or whose tokens differ from the prompt
    keeps the packed loss pass; a row past the tokenized split has nothing to read."""
    from tunesmith.data.dataset import TokenizedSplit

    split = TokenizedSplit.from_lists([[1, 2, 3, 4], [1, 2, 3, 4], [1, 9, 3, 4], [5, 6, 7]],
                                      [[False, False, True, True], [False, True, False, True],
                                       [False, False, True, True], [False, False, False]])
    prompts = [[1, 2], [1, 2], [1, 2], [5, 6, 7], [8]]
    assert compare.continuations(split, prompts) == [([3, 4], [True, True]), None, None, ([], []), None]
