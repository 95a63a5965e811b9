"""End to end through the real command line, as separate processes: prepare → finetune →
evaluate → generate on a tiny model that learns four answers by heart (train, val and test are
the same four rows on purpose, so the leakage check is told to report rather than remove)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from helpers import run_subprocess, write_jsonl

PAIRS = [("What is the capital of France?", "Paris"), ("What color is the sky?", "blue"),
         ("Convert March 5, 2021 to ISO format.", "2021-03-05"), ("Is the fox quick?", "yes")]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models):
    """A config file next to its data, as a user would lay it out (the data path is relative)."""
    folder = tmp_path_factory.mktemp("project")
    write_jsonl(folder / "facts.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    run_dir = folder / "out" / "facts"
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_models("llama")),
        "method": "full",
        "out_dir": str(run_dir),
        "data": {"path": "facts.jsonl", "val_path": "facts.jsonl", "test_path": "facts.jsonl",
                 "clean": {"leakage": "report"}},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 2, "max_steps": 60,
                  "warmup_steps": 5, "lr_schedule": "constant", "eval_interval": 0, "log_interval": 20,
                  "precision": "fp32", "device": "cpu"},
        "eval": {"max_new_tokens": 12},
    }))
    return folder, run_dir


def test_prepare_finetune_evaluate_generate(project):
    folder, run_dir = project
    config = folder / "run.yaml"

    prepared = run_subprocess("prepare", config)
    assert prepared.code == 0, prepared.err
    assert f"Prepared {run_dir / 'data'}  (template: chat)" in prepared.out
    assert "Data format: qa (detected from the keys); template: chat" in prepared.err
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert [manifest["counts"][s]["examples"] for s in ("train", "val", "test")] == [4, 4, 4]

    trained = run_subprocess("finetune", config)
    assert trained.code == 0, trained.err
    assert "Reusing prepared data" in trained.err
    assert "Trained 60 steps" in trained.out
    assert "Attention over packed rows: per_example (CPU: SDPA on each example" in trained.err
    assert "output-layer loss: chunked" in trained.err
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "best").is_dir()
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"loss.png", "lr.png", "throughput.png"}

    evaluated = run_subprocess("evaluate", run_dir)  # a run directory stands for its config
    assert evaluated.code == 0, evaluated.err
    eval_dir = run_dir / "eval"
    table = list(csv.reader((eval_dir / "results.csv").open()))
    assert table[0] == ["metric", "base", "tuned", "change"]
    metrics = {row[0]: [float(x) for x in row[1:]] for row in table[1:]}
    assert set(metrics) == {"test_loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL"}
    assert metrics["exact_match"] == [0.0, 1.0, 1.0]  # learned by heart; the random base knows nothing
    assert metrics["token_f1"][1] == 1.0
    assert metrics["test_loss"][1] < 0.5 * metrics["test_loss"][0]
    base_loss, tuned_loss, change = metrics["test_loss"]
    assert change == pytest.approx(tuned_loss - base_loss, abs=2e-4)
    markdown = (eval_dir / "results.md").read_text()
    assert markdown.startswith("| metric | base | tuned | change |")
    assert "| exact_match | 0.0000 | 1.0000 | +1.0000 |" in markdown
    predictions = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    answers = dict(PAIRS)
    for record in predictions:
        question = record["prompt"][-1]["content"]
        assert record["reference"] == answers[question]
        assert record["tuned"] == record["reference"] and record["tuned_exact_match"] == 1.0
        assert record["tuned_token_f1"] == 1.0
        assert {"base", "base_exact_match", "base_token_f1", "where"} <= set(record)
        assert record["where"].startswith(str(folder / "facts.jsonl") + ":")
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["tuned"]["n_test"] == 4 and results["tuned"]["exact_match"] == 1.0

    generated = run_subprocess("generate", "--adapter", run_dir, "--prompt", "What is the capital of France?")
    assert generated.code == 0, generated.err
    assert generated.out == "Paris\n"  # the response alone: no prompt, no template, no special tokens


def test_errors_in_a_real_process_are_one_line_each(tmp_path):
    result = run_subprocess("finetune", "--train.lr", "1", "--train.batch_size", "3",
                            "--train.micro_batch_size", "2")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "tunesmith: config error: unknown key train.lr (did you mean train.learning_rate?)",
        "tunesmith: config error: train.batch_size=3 is not a multiple of train.micro_batch_size=2",
    ]
    assert result.out == ""


def test_usage(cli):
    result = cli()
    assert result.code == 2
    assert result.out.startswith("usage: tunesmith VERB")
    for verb in ("prepare", "finetune", "evaluate", "generate"):
        assert f"  {verb} " in result.out


def test_bitsandbytes_advice_to_fetch_kernels_from_the_hub_is_not_shown():
    """On a CPU with avx512_bf16, importing bitsandbytes (PEFT does, in every LoRA run) warns that it
    could not download a 4-bit kernel; nothing here may download code, so the warning is noise."""
    import logging

    from tunesmith.cli import quiet_libraries

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    before = bnb_logger.level
    try:
        quiet_libraries()
        assert not bnb_logger.isEnabledFor(logging.WARNING)
        assert bnb_logger.isEnabledFor(logging.ERROR)
    finally:
        bnb_logger.setLevel(before)
