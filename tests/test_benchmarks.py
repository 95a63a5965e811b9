"""Benchmarks through lm-evaluation-harness on a small multiple-choice task defined here, on local
files (no hub). The model's answers are forced: with its final norm zeroed every next-token
distribution is uniform, so a choice's log-likelihood is -(its token count) x log(vocabulary) and
the model always picks the choice with the fewest tokens — the expected accuracy follows by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith import config as config_module
from tunesmith.evaluate import benchmarks
from tunesmith.infer.generate import load_base

# A mark, not a module-level importorskip: test_report imports write_task from here and must not
# be skipped with this module.
NEEDS_LM_EVAL = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is in the test extra: pip install -e '.[test]'")
pytestmark = NEEDS_LM_EVAL

# Gold is the shorter choice (in tokens) in the first three rows and the longer one in the last.
ROWS = [
    {"question": "What color is the sky?", "choices": [" blue", " the quick brown fox"], "label": 0},
    {"question": "Is the fox quick?", "choices": [" the lazy dog jumps", " yes"], "label": 1},
    {"question": "What is the capital of France?", "choices": [" hello world user", " Paris"], "label": 1},
    {"question": "Say hello.", "choices": [" no", " hello world user assistant"], "label": 1},
]
EXPECTED_ACCURACY = 3 / 4


def write_task(folder: Path) -> Path:
    """A task YAML as a user would write one for offline data (dataset_path: json, local files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(folder / "tiny_mc.jsonl")},
                           "cache_dir": str(folder / "hf-cache")},  # keep the datasets cache out of ~
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}]}))
    return folder


@pytest.fixture(scope="module")
def forced_model(tiny_models, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_models("llama")
    folder = tmp_path_factory.mktemp("forced")
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # hidden state 0 → logits 0 → a uniform distribution everywhere
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def test_the_forced_choices_are_the_shortest(forced_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(forced_model)
    picks = []
    for row in ROWS:
        lengths = [len(tokenizer(choice, add_special_tokens=False)["input_ids"]) for choice in row["choices"]]
        assert lengths[0] != lengths[1]
        picks.append(lengths.index(min(lengths)))
    assert sum(p == r["label"] for p, r in zip(picks, ROWS)) / len(ROWS) == EXPECTED_ACCURACY


def test_local_task_gives_the_expected_accuracy(forced_model, tmp_path):
    tasks_dir = write_task(tmp_path / "tasks")
    config = config_module.build({"model": str(forced_model), "eval": {"tasks": "tiny_mc", "tasks_dir": str(tasks_dir),
                                                                       "batch_size": 4},
                                  "train": {"device": "cpu", "precision": "fp32"}})
    scores = benchmarks.run_tasks(load_base(str(forced_model), device="cpu", precision="fp32"), config)
    assert scores == {"tiny_mc": {"acc": EXPECTED_ACCURACY}}


def test_evaluate_tasks_on_the_command_line_without_data(cli, forced_model, tmp_path):
    tasks_dir = write_task(tmp_path / "tasks")
    run_dir = tmp_path / "run"
    result = cli("evaluate", "--model", forced_model, "--out_dir", run_dir, "--tasks", "tiny_mc",
                 "--eval.tasks_dir", tasks_dir, "--train.device", "cpu", "--train.precision", "fp32")
    assert result.code == 0, result.err
    assert "No data.path: skipping the held-out test rows" in result.err
    assert "tiny_mc" in result.out and "0.7500" in result.out
    assert json.loads((run_dir / "eval" / "benchmarks.json").read_text()) == {"base": {"tiny_mc": {"acc": 0.75}}}
    assert (run_dir / "eval" / "benchmarks.md").read_text().splitlines() == [
        "| task | metric | base |", "|---|---|---|", "| tiny_mc | acc | 0.7500 |"]


def test_scores_keep_the_requested_tasks_and_unfiltered_metrics():
    output = {"results": {"mmlu_anatomy": {"acc,none": 0.25}, "arc_easy": {
        "alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.625}},
        "groups": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": "N/A", "alias": "mmlu"}}}
    assert benchmarks.scores(output, ["arc_easy", "mmlu"]) == {
        "arc_easy": {"acc": 0.5, "acc_norm": 0.625}, "mmlu": {"acc": 0.3}}
    header, rows = benchmarks.table_rows({"base": {"arc_easy": {"acc": 0.5}}, "tuned": {"arc_easy": {"acc": 0.75}}})
    assert header == ["task", "metric", "base", "tuned", "change"]
    assert rows == [["arc_easy", "acc", "0.5000", "0.7500", "+0.2500"]]


def test_a_missing_tasks_dir_is_a_config_error(cli, forced_model, tmp_path):
    result = cli("evaluate", "--model", forced_model, "--out_dir", tmp_path / "run", "--tasks", "tiny_mc",
                 "--eval.tasks_dir", tmp_path / "nowhere", "--train.device", "cpu")
    assert result.code == 2
    assert f"eval.tasks_dir: {tmp_path / 'nowhere'} is not a folder of task YAML files" in result.err
