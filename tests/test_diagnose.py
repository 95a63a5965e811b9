"""Learning-curve diagnosis: one synthetic curve of each kind with the numbers the sentences must
quote, then real short runs of a tiny model provoked into divergence, overfitting and a learning
rate too low to move."""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers import fast_train_flags, write_jsonl

from tunesmith.evaluate.diagnose import diagnose, diagnose_run


def curve(steps: int, train, val=None, every: int = 10, val_every: int = 20, noise: float = 0.01,
          lr: float = 1e-3) -> list[dict]:
    """metrics.jsonl records as the loop writes them: training points every `every` steps with a
    little multiplicative noise, validation points every `val_every`."""
    rng = random.Random(0)
    records = []
    for step in range(every, steps + 1, every):
        records.append({"step": step, "loss": train(step) * (1 + rng.uniform(-noise, noise)), "lr": lr,
                        "skipped_steps": 0})
        if val and step % val_every == 0:
            records.append({"step": step, "val_loss": val(step)})
    return records


def test_underfit_still_falling_steeply():
    found = diagnose(curve(200, lambda s: 3 - 1.5 * s / 200, lambda s: 3.1 - 1.4 * s / 200))
    assert found.verdict == "underfit"
    assert found.numbers["end_slope_ratio"] > 0.8  # a straight line: the end falls as fast as the start
    assert "It is still falling steeply." in found.findings[0]
    assert "Validation loss was still falling at the end: 1.8400 to 1.7000" in found.findings[1]
    assert "train longer" in found.advice[0]


def test_overfit_names_the_best_step_and_suggests_stopping_there():
    def val(step):  # lowest at step 60
        return 1.0 + 0.8 * math.exp(-step / 20) + 0.004 * max(0, step - 60)

    found = diagnose(curve(200, lambda s: 2.5 * math.exp(-s / 30) + 0.05, val))
    assert found.verdict == "overfit"
    assert found.numbers["best_val_step"] == 60
    assert found.numbers["best_val_loss"] == pytest.approx(val(60))
    assert found.numbers["last_val_loss"] == pytest.approx(val(200))
    assert f"lowest at step 60 ({val(60):.4f}) and rose to {val(200):.4f} by step 200" in found.findings[1]
    assert "set train.max_steps 60" in found.advice[0] and "early_stopping_patience" in found.advice[0]


def test_well_fit_reports_the_generalization_gap():
    found = diagnose(curve(300, lambda s: 2 * math.exp(-s / 30) + 0.6, lambda s: 2 * math.exp(-s / 30) + 0.8,
                           noise=0.0))
    assert found.verdict == "well_fit"
    assert found.numbers["generalization_gap"] == pytest.approx(0.2, abs=1e-3)
    assert "a generalization gap of +0.2000" in found.findings[1]
    assert found.advice == []


def test_well_fit_without_validation_says_overfitting_cannot_be_ruled_out():
    found = diagnose(curve(300, lambda s: 2 * math.exp(-s / 30) + 0.6))
    assert found.verdict == "well_fit"
    assert "overfitting cannot be ruled out" in found.findings[1]


def test_oscillation_means_the_learning_rate_is_too_high():
    found = diagnose(curve(200, lambda s: 2.0 + (0.9 if (s // 10) % 2 else -0.6), lambda s: 2.5))
    assert found.verdict == "lr_too_high"
    assert found.numbers["up_share"] >= 0.4 and found.numbers["jitter"] > 0.5
    assert "oscillates between" in found.findings[0]
    assert "lower train.learning_rate to 0.00033" in found.advice[0]


def test_a_spike_above_the_start_means_the_learning_rate_is_too_high():
    found = diagnose(curve(100, lambda s: 9.0 if s == 20 else 4.0 - s / 100, noise=0.0))
    assert found.verdict == "lr_too_high"
    assert found.findings[0].startswith("The training loss spiked to 9.0000 at step 20, 2.3x its first value 3.9000")


def test_noise_alone_is_not_oscillation():
    found = diagnose(curve(300, lambda s: 2 * math.exp(-s / 30) + 0.6, noise=0.05))
    assert found.verdict == "well_fit"


def test_wiggles_of_a_loss_converged_near_zero_are_not_oscillation():
    """The logged losses of a real SmolLM2 LoRA run (40 steps of the demo task): near 0 the wiggles
    are large against the level but tiny against the run's fall, 0.53 → 0.02."""
    losses = [0.529, 0.125, 0.069, 0.054, 0.018, 0.07, 0.025, 0.044]
    records = [{"step": 5 * (i + 1), "loss": loss, "lr": 2e-3} for i, loss in enumerate(losses)]
    records += [{"step": 20, "val_loss": 0.02}, {"step": 40, "val_loss": 0.0154}]
    found = diagnose(records)
    assert found.numbers["jitter"] < 0.15
    assert found.verdict == "well_fit"


def test_barely_moving_means_the_learning_rate_is_too_low():
    found = diagnose(curve(200, lambda s: 3.0 - 0.0001 * s, lr=1e-7))
    assert found.verdict == "lr_too_low"
    assert found.numbers["fall"] < 0.02
    assert "barely moved" in found.findings[0]
    assert "raise train.learning_rate to 1e-06" in found.advice[0]


def test_nan_and_skipped_steps_are_divergence():
    records = curve(50, lambda s: 2.0) + [{"step": 60, "loss": float("nan"), "skipped_steps": 3}]
    found = diagnose(records)
    assert found.verdict == "diverged"
    assert "first at step 60; 3 step(s) were skipped" in found.findings[0]


def test_a_blow_up_is_divergence():
    found = diagnose(curve(100, lambda s: 2.0 - s / 100 if s < 40 else 1.6 * math.exp((s - 40) / 15)))
    assert found.verdict == "diverged"
    assert "above where it started" in found.findings[0]


def test_too_few_points():
    assert diagnose(curve(20, lambda s: 2.0)).verdict == "too_short"
    assert diagnose([]).verdict == "too_short"


# Real runs of the tiny llama: each is provoked into one state.

def _train(cli, tmp_path, name: str, rows: list[dict], *flags) -> list[str]:
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return ["finetune", "--data.path", data, "--out_dir", tmp_path / name, "--method", "full",
            "--train.lr_schedule", "constant", *fast_train_flags(), *flags]


def _random_phrases(count: int) -> list[dict]:
    rng = random.Random(0)
    words = ["red", "green", "blue", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world"]
    return [{"question": f"Say the secret phrase number {i}.", "answer": " ".join(rng.choices(words, k=6))}
            for i in range(count)]


def test_real_run_with_a_huge_learning_rate_diverges(cli, llama, tmp_path):
    args = _train(cli, tmp_path, "huge", _random_phrases(12), "--model", llama, "--train.learning_rate", 30,
                  "--train.max_steps", 20, "--train.batch_size", 4, "--train.micro_batch_size", 4,
                  "--data.test_split", 0)
    result = cli(*args)
    assert result.code == 0, result.err
    assert "Diagnosis: Training diverged (learning rate too high)." in result.out
    found = diagnose_run(tmp_path / "huge")
    assert found.verdict == "diverged"
    assert "lower train.learning_rate to 3" in found.advice[0]


def test_real_run_on_a_tiny_dataset_trained_long_overfits(cli, llama, tmp_path):
    """16 rows of random phrases: the validation loss falls while the shared form is learned, then
    rises as the training phrases are memorised."""
    args = _train(cli, tmp_path, "long", _random_phrases(16), "--model", llama, "--train.learning_rate", 5e-3,
                  "--train.max_steps", 80, "--train.batch_size", 4, "--train.micro_batch_size", 4,
                  "--train.eval_interval", 10, "--train.log_interval", 5, "--data.val_split", 0.25,
                  "--data.test_split", 0)
    result = cli(*args)
    assert result.code == 0, result.err
    found = diagnose_run(tmp_path / "long")
    assert found.verdict == "overfit", found.lines()
    records = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best_step, _ = min(val, key=lambda point: point[1])
    assert found.numbers["best_val_step"] == best_step < 80
    assert f"set train.max_steps {best_step}" in found.advice[0]
    assert "Diagnosis: Overfitting: validation loss turned up." in result.out


def test_real_run_with_a_high_learning_rate_spikes(cli, llama, tmp_path):
    args = _train(cli, tmp_path, "high", _random_phrases(12), "--model", llama, "--train.learning_rate", 0.3,
                  "--train.max_steps", 20, "--data.test_split", 0)
    assert cli(*args).code == 0
    found = diagnose_run(tmp_path / "high")
    assert found.verdict == "lr_too_high", found.lines()
    assert found.numbers["highest_loss"] > 1.5 * json.loads(
        (tmp_path / "high" / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_real_run_stopped_early_is_underfit(cli, llama, tmp_path):
    args = _train(cli, tmp_path, "short", _random_phrases(12), "--model", llama, "--train.learning_rate", 1e-3,
                  "--train.max_steps", 12, "--data.test_split", 0)
    assert cli(*args).code == 0
    found = diagnose_run(tmp_path / "short")
    assert found.verdict == "underfit", found.lines()
    assert found.numbers["end_slope_ratio"] > 0.5


def test_real_run_with_a_tiny_learning_rate_barely_moves(cli, llama, tmp_path):
    args = _train(cli, tmp_path, "tiny_lr", _random_phrases(12), "--model", llama, "--train.learning_rate", 1e-8,
                  "--train.max_steps", 12, "--data.test_split", 0)
    assert cli(*args).code == 0
    found = diagnose_run(tmp_path / "tiny_lr")
    assert found.verdict == "lr_too_low"
    assert found.numbers["fall"] < 0.02
