"""Pinned losses: 10 LoRA steps and 10 full fine-tuning steps of the seeded tiny llama on fixed
generated rows, through the real `finetune` command, must log these per-step losses. Each of these
changes was tried and fails the test: the learning rate +1%, one more warmup step, the prompt mask
off by one token, the loss averaged per micro batch instead of over the step, dropout on. An
interrupted run resumed from its step checkpoint must land on the same curve.

When a change is meant to move the numbers, rerun with TUNESMITH_PRINT_LOSSES=1 to print the new
curve, say in the commit why it moved, and paste it here.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch
from helpers import write_jsonl
from safetensors.torch import load_file

WORDS = ["red", "green", "blue", "quick", "brown", "fox", "lazy", "dog", "hello", "world", "yes", "no"]


def recipe_rows(count: int = 40) -> list[dict]:
    """Answers of 1 to 4 words behind prompts of two lengths: the masks and packings vary per step."""
    rows = []
    for i in range(count):
        answer = " ".join(WORDS[(5 * i + k) % len(WORDS)] for k in range(1 + i % 4))
        question = f"Say phrase number {i}." if i % 3 else f"Please say the phrase with number {i}, quickly."
        rows.append({"question": question, "answer": answer})
    return rows


COMMON = ["--data.val_split", 0, "--data.test_split", 0, "--train.max_steps", 10, "--train.batch_size", 4,
          "--train.micro_batch_size", 2, "--train.warmup_steps", 2, "--train.lr_schedule", "cosine",
          "--train.eval_interval", 0, "--train.log_interval", 1, "--train.save_interval", 5,
          "--train.precision", "fp32", "--train.device", "cpu", "--train.seed", 42]
RECIPES = {
    "lora": ["--method", "lora", "--lora.r", 8, "--lora.alpha", 32, "--lora.dropout", 0,
             "--train.learning_rate", 2e-2],
    "full": ["--method", "full", "--train.learning_rate", 3e-3],
}
# Measured with torch 2.13 on a Xeon with AVX-512: run to run and with OMP_NUM_THREADS 1 or 2 the
# curves are bitwise equal; with ATen, MKL and oneDNN held to AVX2 or to no vector unit (the kernels
# another CPU would pick) they move by at most 2e-7 relative. The smallest real change tried moves a
# loss by 1e-3 or more (learning rate +1%: 2e-3; loss averaged per micro batch instead of over the
# step: 1.6e-3; attention dropout 0.1: 1.3e-3), so REL_TOLERANCE sits well between the two.
PINNED = {
    "lora": [5.990508079528809, 5.9030561447143555, 5.7429680824279785, 5.768909454345703, 5.76873254776001,
             5.703442096710205, 5.743983268737793, 5.752640724182129, 5.750838756561279, 5.815665245056152],
    "full": [5.990508079528809, 5.897548675537109, 5.54276704788208, 5.385197639465332, 5.188446998596191,
             4.94369649887085, 4.7822113037109375, 4.711753845214844, 4.5802903175354, 4.641281604766846],
}
REL_TOLERANCE = 1e-4


def finetune(cli, llama, data, run_dir, method: str, *extra):
    return cli("finetune", "--model", llama, "--data.path", data, "--out_dir", run_dir, *COMMON, *RECIPES[method],
               *extra)


def logged_losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def assert_pinned(losses: list[tuple[int, float]], method: str) -> None:
    if os.environ.get("TUNESMITH_PRINT_LOSSES"):
        print(f"\n{method}: {[loss for _, loss in losses]!r}", file=sys.__stdout__)  # past capsys
    assert [step for step, _ in losses] == list(range(1, 11))
    assert [loss for _, loss in losses] == pytest.approx(PINNED[method], rel=REL_TOLERANCE, abs=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("recipe-data") / "phrases.jsonl", recipe_rows())


@pytest.mark.parametrize("method", list(RECIPES))
def test_ten_steps_log_the_pinned_losses(cli, llama, data, tmp_path, method):
    run_dir = tmp_path / "run"
    result = finetune(cli, llama, data, run_dir, method)
    assert result.code == 0, result.err
    assert_pinned(logged_losses(run_dir), method)


@pytest.mark.parametrize("method", list(RECIPES))
def test_a_run_interrupted_after_step_5_resumes_onto_the_same_curve(cli, llama, data, tmp_path, monkeypatch,
                                                                     method):
    """Ctrl-C during step 5 (a real SIGINT to this process, sent from inside the 5th AdamW update):
    the step finishes, step-000005 is saved, the run exits 130; `--resume` continues from it and
    logs the pinned losses of steps 6 to 10, ending with the weights of the uninterrupted run."""
    real_update, updates = torch.optim.AdamW.step, []

    def update_then_ctrl_c(self, *args, **kwargs):
        result = real_update(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 5:
            signal.raise_signal(signal.SIGINT)
        return result

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", update_then_ctrl_c)
        result = finetune(cli, llama, data, run_dir, method)
    assert result.code == 130, result.err
    assert f"SIGINT at step 5: saved {run_dir / 'step-000005'}" in result.err
    assert [step for step, _ in logged_losses(run_dir)] == [1, 2, 3, 4, 5]
    assert not (run_dir / "final").exists()

    result = finetune(cli, llama, data, run_dir, method, "--resume")
    assert result.code == 0, result.err
    assert f"Resuming from {run_dir / 'step-000005'} at step 5 of 10" in result.err
    assert_pinned(logged_losses(run_dir), method)

    whole = tmp_path / "whole"
    assert finetune(cli, llama, data, whole, method).code == 0
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    ours, theirs = load_file(str(run_dir / "final" / weights)), load_file(str(whole / "final" / weights))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name  # bitwise: the same kernels in the same order
