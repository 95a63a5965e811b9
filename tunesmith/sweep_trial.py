"""One trial of a sweep: `python -m tunesmith finetune base.yaml --out_dir trial-NNN --key value ...`
in its own process, watched through the validation losses it appends to its metrics.jsonl. With a
score as the metric, `tunesmith evaluate` then scores the trained run on the test split (tuned
model only) in a process of its own, and the study is told the negated score: lower is better
throughout, as for the validation losses the pruner compares during training.

A crash or Ctrl-C in the trial never corrupts the study; the pruner stops a trial with SIGINT
(the run saves a checkpoint and exits 130); Ctrl-C or SIGTERM to the sweep stops the running trial
the same way and queues it to run again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tunesmith
from tunesmith import sweep_report
from tunesmith.errors import TunesmithError
from tunesmith.log import say
from tunesmith.sweep_space import Space, yaml_text
from tunesmith.sweep_study import retry

POLL_SECONDS = 0.2


class SweepInterrupted(TunesmithError):
    exit_code = 130


@dataclass
class Watched:
    reported: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    pruned_at: int | None = None
    score: float | None = None  # the metric's value after training, when the metric is a score
    score_error: str = ""


def run_trial(study, trial, space: Space, sweep_dir: Path, base_file: Path, again: str) -> None:
    import optuna

    study.sampler = space.make_sampler(optuna, trial.number)  # the values are drawn just below
    values = {p.key: p.suggest(trial) for p in space.params}
    run_dir = sweep_dir / f"trial-{trial.number:03d}"
    for key, value in (("run_dir", str(run_dir)), ("host", socket.gethostname()), ("pid", os.getpid())):
        trial.set_user_attr(key, value)
    say(f"Trial {trial.number}: {sweep_report.describe(values)}  ({run_dir})")
    log_path = sweep_dir / "logs" / f"trial-{trial.number:03d}.log"
    process = None
    try:
        reuse_prepared_data(sweep_dir, run_dir)
        process = start_trial(trial_command(base_file, run_dir, values), log_path)
        watched = watch(process, trial, run_dir / "metrics.jsonl")
        if space.scored and process.returncode == 0 and watched.pruned_at is None:
            process = start_trial(evaluate_command(run_dir), log_path, append=True)
            process.wait()
            watched.score, watched.score_error = read_score(run_dir, space.metric, process.returncode)
    except KeyboardInterrupt:
        if process is not None:
            stop(process)
        retry(study, trial.number, trial.params)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise SweepInterrupted(f"sweep interrupted during trial {trial.number} (stopped; it runs again as a "
                               f"new trial). Continue with: {again}") from None
    finish(study, trial, watched, process.returncode, log_path, space.metric)


def trial_command(base_file: Path, run_dir: Path, values: dict) -> list[str]:
    flags = [f"--{key}={yaml_text(value)}" for key, value in values.items()]
    return [sys.executable, "-m", "tunesmith", "finetune", str(base_file), f"--out_dir={run_dir}", *flags]


def evaluate_command(run_dir: Path) -> list[str]:
    """The trained model alone on the run's test split (the base model is the same for every trial)."""
    return [sys.executable, "-m", "tunesmith", "evaluate", str(run_dir / "config.yaml"), "--eval.compare_base=false"]


def read_score(run_dir: Path, metric: str, exit_code: int) -> tuple[float | None, str]:
    """(the tuned model's score, "") from eval/results.json, or (None, why not)."""
    results = run_dir / "eval" / "results.json"
    if exit_code != 0 or not results.is_file():
        return None, f"evaluate exit code {exit_code}"
    value = json.loads(results.read_text()).get("tuned", {}).get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"evaluate wrote no finite {metric}"
    return float(value), ""


def start_trial(command: list[str], log_path: Path, append: bool = False) -> subprocess.Popen:
    """The trial in its own process group (a terminal's Ctrl-C reaches the sweep, which stops the trial
    cleanly), running this same tunesmith, its output in the log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(tunesmith.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with log_path.open("a" if append else "w", encoding="utf-8") as log:
        # preexec_fn is unsafe only with threads running, and the sweep starts none
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)  # noqa: PLW1509


def _stop_with_parent() -> None:
    """Linux: the trial gets SIGTERM (it saves a checkpoint and exits) if the sweep dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def watch(process: subprocess.Popen, trial, metrics_path: Path) -> Watched:
    """Report each validation loss as it appears; SIGINT the trial when the pruner rejects it. The
    records are read to the end after the process exits, so whether a trial is pruned depends on
    its losses, not on when the sweep read them."""
    tail, watched = MetricsTail(metrics_path), Watched()
    while True:
        exited = process.poll() is not None
        for step, loss in tail.validation_losses():
            if watched.pruned_at is not None:
                break
            trial.report(loss, step)
            watched.reported.append((step, loss))
            if trial.should_prune():
                watched.pruned_at = step
                interrupt(process)
        if exited:
            return watched
        time.sleep(POLL_SECONDS)


def interrupt(process: subprocess.Popen) -> None:
    """SIGINT to the trial's process group, as Ctrl-C in its terminal would: it saves and exits 130."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def stop(process: subprocess.Popen) -> None:
    interrupt(process)
    try:
        process.wait()
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        process.kill()
        process.wait()


class MetricsTail:
    """The validation losses a running trial appends to its metrics.jsonl, whole lines only."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def validation_losses(self) -> list[tuple[int, float]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return [(record["step"], float(record["val_loss"])) for record in records if "val_loss" in record]


def finish(study, trial, watched: Watched, exit_code: int, log_path: Path, metric: str = "val_loss") -> None:
    from optuna.trial import TrialState

    finite = [(loss, step) for step, loss in watched.reported if math.isfinite(loss)]
    if watched.pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        say(f"Trial {trial.number}: pruned at step {watched.pruned_at} (validation loss "
            f"{watched.reported[-1][1]:.4f})")
    elif exit_code == 0 and finite and watched.score is not None:
        trial.set_user_attr("score", watched.score)
        study.tell(trial, -watched.score)  # negated: the study minimises
        say(f"Trial {trial.number}: {metric} {watched.score:.4f} (best validation loss {min(finite)[0]:.4f})")
    elif exit_code == 0 and finite and not watched.score_error:
        loss, step = min(finite)
        study.tell(trial, loss)
        say(f"Trial {trial.number}: best validation loss {loss:.4f} at step {step}")
    else:
        error = watched.score_error if exit_code == 0 and finite else failure(exit_code, watched, log_path)
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        say(f"Trial {trial.number}: failed: {error} (log: {log_path})")


def failure(exit_code: int, watched: Watched, log_path: Path) -> str:
    if exit_code == 0:
        return "no validation loss was logged" if not watched.reported else "the validation loss was never finite"
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("tunesmith:")]
    last = (ours or lines or [""])[-1].removeprefix("tunesmith:").strip()
    return f"exit code {exit_code}: {last}"[:300]


def reuse_prepared_data(sweep_dir: Path, run_dir: Path) -> None:
    """Hard-link the newest local trial's prepared data into the new trial: finetune reuses it only
    when the data, its settings and the tokenizer match (its manifest's key), else prepares anew."""
    donors = sorted(sweep_dir.glob("trial-*/data/manifest.json"))
    if not donors or (run_dir / "data").exists():
        return
    shutil.copytree(donors[-1].parent, run_dir / "data", copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM stops the sweep as Ctrl-C does: the running trial is stopped cleanly and queued again."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
