"""tunesmith sweep: a grid runs each value once and best.yaml holds the value with the lower
validation loss (or the higher evaluation score, with a score as the metric); a sweep killed mid-trial resumes without redoing finished trials; the pruner stops
a hopeless trial; two workers share one SQLite study; a bad space file is one line naming the key.
Every trial is a real finetune subprocess on the tiny random llama (a few steps each)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import REPO, qa_rows, write_jsonl

from tunesmith import config as config_module

optuna = pytest.importorskip("optuna")

TRAIN = {"max_steps": 6, "batch_size": 2, "micro_batch_size": 2, "warmup_steps": 0, "eval_interval": 2,
         "eval_iters": 2, "precision": "fp32", "device": "cpu", "save_interval": 0, "log_interval": 1}


def write_config(folder: Path, model: Path, data: Path, lora_dropout: float = 0.05, **train) -> Path:
    config = {"model": str(model), "data": {"path": str(data)}, "train": {**TRAIN, **train},
              "lora": {"r": 4, "dropout": lora_dropout}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


def sweep_command(config: Path, space: Path, sweep_dir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "sweep", str(config), "--space", str(space),
            "--out_dir", str(sweep_dir), *extra]


def table(sweep_dir: Path) -> dict[int, dict]:
    with (sweep_dir / "trials.csv").open() as handle:
        return {int(row["trial"]): row for row in csv.DictReader(handle)}


def best_val_loss(run_dir: Path) -> float:
    return min(r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "val_loss" in r)


def last_step(run_dir: Path) -> int:
    return max(r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))


def wait_until(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process is None or process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.02)


def has_validation_loss(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and "val_loss" in path.read_text()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sweep-data") / "d.jsonl", qa_rows(40))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, llama, data):
    """A grid over two learning rates, its process killed (SIGKILL) during the second trial, then
    `--resume`d in-process."""
    from tunesmith.cli import main

    folder = tmp_path_factory.mktemp("sweep-grid")
    config = write_config(folder, llama, data, max_steps=12)  # trial 1 trains long enough to be killed in
    space = write_space(folder, "train.learning_rate: [1e-4, 3e-2]\n")
    sweep_dir = folder / "sweep"
    process = subprocess.Popen(sweep_command(config, space, sweep_dir), cwd=REPO, env=dict(os.environ),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # trial 0 is done and trial 1 is inside its training loop (its first validation pass is logged)
    wait_until(lambda: has_validation_loss(sweep_dir / "trial-001"), "trial 1's first validation", process)
    process.kill()
    process.communicate()
    # The trial, its parent gone, gets SIGTERM: it saves a step checkpoint and exits.
    wait_until(lambda: list(sweep_dir.glob("trial-001/step-*/manifest.json")), "trial 1's checkpoint", timeout=60)
    first = sweep_dir / "trial-000" / "metrics.jsonl"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    code = main(["sweep", str(config), "--space", str(space), "--out_dir", str(sweep_dir), "--resume"])
    return SimpleNamespace(sweep_dir=sweep_dir, code=code, first_trial_before=before)


def test_grid_runs_each_value_once_and_best_yaml_holds_the_lower_loss(resumed):
    sweep_dir = resumed.sweep_dir
    assert resumed.code == 0
    rows = table(sweep_dir)
    complete = {n: row for n, row in rows.items() if row["state"] == "complete"}
    assert sorted(float(row["train.learning_rate"]) for row in complete.values()) == [1e-4, 3e-2]
    losses = {float(row["train.learning_rate"]): best_val_loss(sweep_dir / f"trial-{n:03d}")
              for n, row in complete.items()}
    for n, row in complete.items():  # the table's loss is the trial's own best, from its metrics
        assert float(row["best_val_loss"]) == pytest.approx(best_val_loss(sweep_dir / f"trial-{n:03d}"))
    best = config_module.load(sweep_dir / "best.yaml")  # a complete config finetune accepts
    assert best.train.learning_rate == min(losses, key=losses.get)
    assert best.train.max_steps == 12 and best.lora.r == 4 and best.out_dir is None
    assert (sweep_dir / "plots" / "sweep.png").stat().st_size > 0
    assert "Best: trial" in (sweep_dir / "summary.md").read_text()


def test_resume_after_a_kill_runs_only_the_interrupted_trial_again(resumed):
    sweep_dir = resumed.sweep_dir
    first = sweep_dir / "trial-000" / "metrics.jsonl"
    assert (first.read_bytes(), first.stat().st_mtime_ns) == resumed.first_trial_before  # not redone
    rows = table(sweep_dir)
    assert [rows[n]["state"] for n in sorted(rows)] == ["complete", "interrupted", "complete"]
    assert rows[1]["note"] == "retried as trial 2" and rows[2]["note"] == "retry of trial 1"
    assert rows[1]["train.learning_rate"] == rows[2]["train.learning_rate"]
    assert sorted(p.name for p in sweep_dir.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]
    assert not (sweep_dir / "trial-001" / "final").exists()  # it was stopped, then run again in full
    assert (sweep_dir / "trial-002" / "final").is_dir()


def test_pruner_stops_a_trial_whose_loss_ranks_below_the_others(cli, tmp_path, llama, data):
    """Grid order is the file's: lr 3e-2 trains first; lr 30 (hopeless) is then compared at its first
    rung, step 4, with successive halving (reduction factor 2) and stopped there. No LoRA dropout,
    so both courses are fixed (at step 2 the tiny model's losses are still too close to rank). 100 steps:
    the SIGINT comes up to a second after step 4 (a fresh CI once saw a 30-step trial end first)."""
    config = write_config(tmp_path, llama, data, max_steps=100, eval_interval=4, lora_dropout=0.0)
    space = write_space(tmp_path, "train.learning_rate: [3e-2, 30.0]\n"
                                  "pruner: {type: asha, min_resource: 4, reduction_factor: 2}\n")
    sweep_dir = tmp_path / "sweep"
    result = cli("sweep", config, "--space", space, "--out_dir", sweep_dir)
    assert result.code == 0, result.err
    rows = table(sweep_dir)
    assert [rows[0]["state"], rows[1]["state"]] == ["complete", "pruned"]
    assert rows[1]["note"] == "pruned at step 4"
    assert last_step(sweep_dir / "trial-000") == 100 and (sweep_dir / "trial-000" / "final").is_dir()
    assert last_step(sweep_dir / "trial-001") < 100  # SIGINT stopped it: a checkpoint, no final/
    assert not (sweep_dir / "trial-001" / "final").exists()
    assert list((sweep_dir / "trial-001").glob("step-*"))
    assert "pruned" in result.out
    assert config_module.load(sweep_dir / "best.yaml").train.learning_rate == 3e-2


def test_a_score_metric_ranks_trials_by_the_evaluation_of_each_trained_run(cli, tmp_path, llama, data):
    """metric: token_f1: after training, each trial's tuned model alone is evaluated on the test split;
    the table, the study and best.yaml follow that score (highest first), not the validation loss."""
    config = write_config(tmp_path, llama, data, max_steps=12, lora_dropout=0.0)
    space = write_space(tmp_path, "train.learning_rate: [1e-5, 3e-2]\nmetric: token_f1\n")
    sweep_dir = tmp_path / "sweep"
    result = cli("sweep", config, "--space", space, "--out_dir", sweep_dir)
    assert result.code == 0, result.err
    rows = table(sweep_dir)
    scores = {}
    for n, row in rows.items():
        evaluated = json.loads((sweep_dir / f"trial-{n:03d}" / "eval" / "results.json").read_text())
        assert list(evaluated) == ["tuned"]  # the base model is not evaluated again for every trial
        scores[n] = evaluated["tuned"]["token_f1"]
        assert float(row["token_f1"]) == pytest.approx(scores[n])
        assert float(row["best_val_loss"]) == pytest.approx(best_val_loss(sweep_dir / f"trial-{n:03d}"))
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert {t.number: -t.value for t in study.get_trials()} == pytest.approx(scores)
    winner = max(scores, key=lambda n: (scores[n], -n))  # the first of equal scores
    best = config_module.load(sweep_dir / "best.yaml")
    assert best.train.learning_rate == float(rows[winner]["train.learning_rate"])
    assert f"token_f1 {scores[winner]:.4f}" in result.out
    assert "ranked by the token_f1" in (sweep_dir / "summary.md").read_text()


def test_a_score_metric_needs_a_test_split(cli, tmp_path, llama, data):
    config = write_config(tmp_path, llama, data)
    space = write_space(tmp_path, "lora.r: [4, 8]\nmetric: exact_match\n")
    result = cli("sweep", config, "--space", space, "--out_dir", tmp_path / "sweep", "--data.test_split", "0")
    assert result.code == 2 and "metric=exact_match scores each trial on the test split" in result.err
    assert not list((tmp_path / "sweep").glob("trial-*"))


def test_two_workers_share_one_sqlite_study(tmp_path, llama, data):
    config = write_config(tmp_path, llama, data)
    space = write_space(tmp_path, "train.learning_rate: {low: 1e-4, high: 1e-1, log: true}\n"
                                  "sampler: random\ntrials: 2\nseed: 7\n")
    sweep_dir = tmp_path / "sweep"
    workers = [subprocess.Popen(sweep_command(config, space, sweep_dir), cwd=REPO, env=dict(os.environ),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    trials = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert sorted(t.number for t in trials) == [0, 1]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["train.learning_rate"] for t in trials}) == 2  # each trial drew its own values
    assert sorted(p.name for p in sweep_dir.glob("trial-*")) == ["trial-000", "trial-001"]
    assert all((sweep_dir / f"trial-{n:03d}" / "final").is_dir() for n in range(2))


@pytest.mark.parametrize("text, key, words", [
    ("train.learnin_rate: [1e-4, 1e-3]\n", "train.learnin_rate", "did you mean train.learning_rate"),
    ("lora.dropout: {low: 0.0, high: 1.0}\ntrials: 2\n", "lora.dropout", "less than 1"),
    ("train.learning_rate: {low: 1e-2, high: 1e-5}\ntrials: 2\n", "train.learning_rate", "must be below high"),
    ("train.learning_rate: {low: 1e-5, high: 1e-3, log: true}\nsampler: grid\n", "train.learning_rate",
     "grid needs a list"),
    ("lora.r: [4, 8]\npruner: {type: asha, patience: 3}\n", "pruner.patience", "not an option of asha"),
    ("lora.r: [4, 8]\nsampler: tpe\n", "sampler", "needs a budget"),
    ("lora.r: 8\n", "lora.r", "list of choices"),
    ("lora.r: [4, 8]\ntrails: 4\n", "trails", "did you mean trials"),
    ("lora: {r: [4, 8]}\n", "lora", "lora.r: [...]"),
])
def test_bad_space_file_is_one_line_naming_the_key(cli, tmp_path, data, text, key, words):
    config = write_config(tmp_path, tmp_path / "model", data)
    space = write_space(tmp_path, text)
    result = cli("sweep", config, "--space", space, "--out_dir", tmp_path / "sweep")
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2
    assert len(lines) == 1, lines
    assert f"{space}: " in lines[0] and key in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "sweep").exists()  # nothing is created before the space file is good


def test_help_and_a_missing_space_file(cli, tmp_path, data):
    shown = cli("sweep", "--help")
    assert shown.code == 0 and "--space FILE" in shown.out and "--train.learning_rate" in shown.out
    missing = cli("sweep", write_config(tmp_path, tmp_path / "model", data))
    assert missing.code == 2 and "--space FILE is required" in missing.err
