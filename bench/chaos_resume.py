"""Kill training with SIGKILL at random moments, resume it, and check that nothing was lost.

    .venv/bin/python bench/chaos_resume.py [--runs 20] [--seed 0] [--steps 60] [--write]

One uninterrupted reference run, then `--runs` runs of the same config, each killed with SIGKILL
1-2 times and resumed with `tunesmith finetune run.yaml --resume` until it finishes. The model is
the tiny random llama of tests/tiny.py (2 layers, hidden size 64), trained with LoRA (dropout on,
so the resumed random state matters) on generated question/answer rows, fp32 on the CPU, a step-*
checkpoint every 3 steps (the newest 2 kept) and a validation pass every 5 (best/ when it improves),
so that checkpoint writes are frequent.

Where a kill lands (seeded plan, timing decides the exact moment):
  step        a random step of the attempt (after the resumed one), at a random moment of up to
              one step's time after the previous step was logged (it may land in a validation
              pass or a save, which is then what it is counted as);
  checkpoint  a chosen upcoming save (step-N, best or final): once its `<name>.tmp` folder appears,
              a random delay of up to 1.2x the save's duration measured in the reference run;
  start-up    a random moment between launch and the first step (resumed attempts only).
The first attempt is never killed before its first step-* checkpoint is complete (there would be
nothing to resume from, and `--resume` rightly refuses).

A kill is SIGSTOP first: with the process frozen the phase it is in and the checkpoints on disk are
recorded, then SIGKILL. Measured per run: the final adapter against the reference's, tensor by
tensor, bit for bit (also best/ and metrics.jsonl); checkpoints lost (a step-*/best/final folder
that verified, or that tunesmith's recover() would put back from its .tmp/.old copy, at one look
and is missing or does not verify at a later one, except step-* folders that pruning was entitled
to remove because train.save_total_limit newer complete ones exist); resumes that refused or
crashed; resumes that went back further than the newest complete step-* folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Nothing may reach a model hub; tiny models gain nothing from threads on a shared CPU.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # after the thread setting above
from processes import cpu_model  # bench/ is on the path of a script run from it
from safetensors.torch import load_file

from tunesmith.train import checkpoint
from tunesmith.train.flops import PEAK_FILE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_BEGIN, RESULTS_END = "<!-- chaos_resume:begin -->", "<!-- chaos_resume:end -->"
SAVE_INTERVAL = 3  # steps between step-* checkpoints
KEEP = 2  # train.save_total_limit
EVAL_INTERVAL = 5  # steps between validation passes (best/ is saved when the loss improves)
ROWS = 80  # generated question/answer rows
LORA_RANK = 4
MAX_KILLS = 2  # per run; each kill costs a resumed process's start-up (seconds of imports)
POLL_SECONDS = 0.001  # for folders: a save of the tiny model lasts tens of milliseconds
STDERR_POLL_SECONDS = 0.005  # for log lines: what they announce comes at least a step later
ATTEMPT_TIMEOUT_SECONDS = 300
ADAPTER = "adapter_model.safetensors"
USABLE = ("complete", "recoverable")

# What the process was doing when it was frozen, from what is on disk at that moment.
PHASES = {
    "start-up": "start-up (imports, data, model; before the first step)",
    "step": "training (a step, a validation pass, metrics, pruning old step-* folders)",
    "writing": "checkpoint write: files of <name>.tmp being written",
    "unrenamed": "checkpoint write: <name>.tmp complete, not yet renamed into place",
    "old-copy": "checkpoint write: renamed, the replaced <name>.old not yet removed",
    "after-final": "after training: final/ saved, plots and report being written",
}


# ---------------------------------------------------------------------------------------------
# Inputs: a tiny model, generated rows, one config, a private cache.

def make_inputs(work: Path, seed: int, steps: int) -> Path:
    """The tiny llama, the data and run.yaml under `work`; returns run.yaml."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    model = tiny.make_model(work / "llama", "llama", seed=seed)
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(ROWS)]
    data = tiny.write_jsonl(work / "data.jsonl", [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"}
                                                  for a, b in pairs])
    config = {"model": str(model), "method": "lora",
              "data": {"path": str(data), "val_split": 0.1, "test_split": 0.1},
              "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 2e-2,
                        "warmup_steps": 2, "save_interval": SAVE_INTERVAL, "save_total_limit": KEEP,
                        "eval_interval": EVAL_INTERVAL, "eval_iters": 2, "log_interval": 1,
                        "precision": "fp32", "device": "cpu", "seed": seed},
              "lora": {"r": LORA_RANK, "dropout": 0.05}}
    (work / "run.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    return work / "run.yaml"


def private_cache(work: Path) -> Path:
    """A TUNESMITH_CACHE of our own, seeded with a peak FLOP/s (it only feeds the MFU figure) so that
    no run spends a second measuring it."""
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    table = {f"cpu-{torch.get_num_threads()}/torch.{dtype}": 1e11 for dtype in ("float32", "bfloat16")}
    (cache / PEAK_FILE).write_text(json.dumps(table))
    return cache


def child_env(cache: Path) -> dict:
    return {**os.environ, "TUNESMITH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------
# One attempt: a `tunesmith finetune` process we watch through its run directory and stderr.

@dataclass
class Attempt:
    process: subprocess.Popen
    run_dir: Path
    stderr_path: Path
    launched: float  # time.monotonic()
    launched_wall: float  # time.time(), to tell this attempt's folders from older ones

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def training(self) -> bool:
        return "Training " in self.stderr()

    def resumed_at(self) -> tuple[str | None, int]:
        """The checkpoint it resumed from (its name) and its step; (None, 0) on a fresh start."""
        found = re.search(r"Resuming from (\S+) at step (\d+) of", self.stderr())
        return (Path(found.group(1)).name, int(found.group(2))) if found else (None, 0)

    def fresh(self, path: Path) -> bool:
        """Whether `path` was made (or renamed) by this attempt, not left by an earlier one."""
        try:
            status = path.stat()
        except FileNotFoundError:
            return False
        # file times come from a coarse kernel clock (a few ms behind time.time())
        return max(status.st_mtime, status.st_ctime) >= self.launched_wall - 0.1


def launch(config: Path, run_dir: Path, resume: bool, log_stem: Path, env: dict) -> Attempt:
    command = [sys.executable, "-m", "tunesmith", "finetune", str(config), "--out_dir", str(run_dir)]
    stderr_path = log_stem.with_suffix(".stderr")
    with stderr_path.open("w") as stderr, log_stem.with_suffix(".stdout").open("w") as stdout:
        process = subprocess.Popen(command + (["--resume"] if resume else []), cwd=REPO, env=env,
                                   stdout=stdout, stderr=stderr)
    return Attempt(process, run_dir, stderr_path, time.monotonic(), time.time())


def wait_until(attempt: Attempt, ready, timeout_seconds: float = ATTEMPT_TIMEOUT_SECONDS,
               poll_seconds: float = POLL_SECONDS) -> bool:
    """Poll until ready() is true (True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if ready():
            return True
        if attempt.process.poll() is not None:
            return False
        time.sleep(poll_seconds)
    raise TimeoutError(f"{attempt.run_dir}: nothing happened for {timeout_seconds} s")


def steps_logged(run_dir: Path) -> int:
    """The last training step metrics.jsonl has a record of (log_interval is 1)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if "loss" in record:
            return record["step"]
    return 0


def sleep_while_running(attempt: Attempt, seconds: float) -> bool:
    """False when the process ended meanwhile."""
    deadline = time.monotonic() + seconds
    return wait_until(attempt, lambda: time.monotonic() >= deadline, seconds + 60)


# ---------------------------------------------------------------------------------------------
# What is on disk: usable checkpoints, and the phase a frozen process is in.

def is_checkpoint_name(name: str) -> bool:
    base = name.removesuffix(".tmp").removesuffix(".old")
    return base in ("best", "final") or (base.startswith("step-") and base[5:].isdigit())


def readable(folder: Path) -> bool:
    """The manifest's checksums hold and the adapter loads."""
    if not folder.is_dir() or checkpoint.verify(folder) is not None:
        return False
    try:
        load_file(str(folder / ADAPTER))
    except Exception:  # noqa: BLE001  (any failure to read is what we count)
        return False
    return True


def checkpoint_states(run_dir: Path) -> dict[str, str]:
    """Every checkpoint name in the run directory: complete (verifies), recoverable (missing, but its
    .tmp or .old copy verifies, so recover() puts it back), broken (there, does not verify), or
    partial (only an unfinished .tmp)."""
    names = {p.name.removesuffix(".tmp").removesuffix(".old") for p in run_dir.iterdir()
             if p.is_dir() and is_checkpoint_name(p.name)} if run_dir.is_dir() else set()
    states = {}
    for name in sorted(names):
        folder = run_dir / name
        if folder.is_dir():
            states[name] = "complete" if readable(folder) else "broken"
        elif any(readable(run_dir / (name + suffix)) for suffix in (".tmp", ".old")):
            states[name] = "recoverable"
        else:
            states[name] = "partial"
    return states


def phase_of(attempt: Attempt) -> str:
    """Read while the process is frozen; folders left by earlier attempts are not this one's doing."""
    mine = [p for p in attempt.run_dir.iterdir() if is_checkpoint_name(p.name) and p.name.endswith((".tmp", ".old"))
            and attempt.fresh(p)]
    if any(p.name.endswith(".old") for p in mine):
        return "old-copy"
    if any((p / checkpoint.MANIFEST).is_file() for p in mine):
        return "unrenamed"
    if mine:
        return "writing"
    if not attempt.training():
        return "start-up"
    return "after-final" if attempt.fresh(attempt.run_dir / "final") else "step"


def lost_between(earlier: dict[str, str], later: dict[str, str]) -> list[str]:
    """Checkpoints usable at the earlier look that the later one no longer has, except step-* folders
    pruning was entitled to remove (KEEP newer complete ones exist at the later look)."""
    newer_steps = [n for n, s in later.items() if n.startswith("step-") and s == "complete"]
    lost = []
    for name, state in earlier.items():
        if state not in USABLE or later.get(name) in USABLE:
            continue
        if name.startswith("step-") and sum(n > name for n in newer_steps) >= KEEP:
            continue
        lost.append(f"{name} ({later.get(name, 'gone')})")
    return lost


# ---------------------------------------------------------------------------------------------
# Killing: freeze, look, kill, look again.

@dataclass
class Kill:
    kind: str  # step | checkpoint | start-up: what the plan aimed at
    target: str  # the step or save aimed at, or the seconds after launch (start-up kills)
    phase: str  # key of PHASES: what the process was doing
    seconds: float  # into the attempt
    before: dict[str, str]
    after: dict[str, str]


def frozen(pid: int, timeout_seconds: float = 10) -> bool:
    """Wait until SIGSTOP has taken effect (a call into the kernel, e.g. an fsync, finishes first);
    False when the process had already exited."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in "Tt":
            return True
        if state in "ZX":
            return False
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"process {pid} did not stop")


def kill_now(attempt: Attempt, kind: str, target: str) -> Kill | None:
    """SIGKILL at this moment, with the phase and the checkpoints recorded just before and after;
    None when the process finished first."""
    process = attempt.process
    if process.poll() is not None:
        return None
    os.kill(process.pid, signal.SIGSTOP)
    if not frozen(process.pid):
        process.wait()
        return None
    seconds = time.monotonic() - attempt.launched
    phase, before = phase_of(attempt), checkpoint_states(attempt.run_dir)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return Kill(kind, target, phase, seconds, before, checkpoint_states(attempt.run_dir))


@dataclass
class Reference:
    """Timings of the uninterrupted run, which size the random delays, and where it saved best/."""

    run_dir: Path
    startup_seconds: float  # launch to the first step
    seconds_per_step: float  # training time / steps, saves and validation included
    save_seconds: dict[str, float]  # step | best | final: how long a <name>.tmp folder lived
    best_steps: list[int]
    wall_seconds: float


def upcoming_saves(reference: Reference, total_steps: int, after_step: int) -> dict[str, list[str]]:
    saves = {"step": [f"step-{n:06d}" for n in range(SAVE_INTERVAL, total_steps, SAVE_INTERVAL) if n > after_step],
             "best": ["best"] if any(n > after_step for n in reference.best_steps) else [],
             "final": ["final"]}
    return {kind: names for kind, names in saves.items() if names}


def staged_kill(attempt: Attempt, kind: str, rng: random.Random, reference: Reference, total_steps: int,
                first: bool) -> Kill | None:
    """Wait for the moment the plan names, then kill; None when the run finished first."""
    if kind == "start-up":
        delay_seconds = rng.uniform(0, reference.startup_seconds)
        if not sleep_while_running(attempt, delay_seconds):
            return None
        return kill_now(attempt, kind, f"{delay_seconds:.1f} s")
    if not wait_until(attempt, attempt.training, poll_seconds=STDERR_POLL_SECONDS):
        return None
    start_step = attempt.resumed_at()[1]
    if first:  # never before the first step-* checkpoint is complete: nothing to resume from
        start_step = SAVE_INTERVAL
        first_save = attempt.run_dir / f"step-{SAVE_INTERVAL:06d}" / checkpoint.MANIFEST
        if not wait_until(attempt, first_save.is_file):
            return None
    if kind == "step":  # by progress, not by clock: the machine's speed varies
        target_step = rng.randint(start_step + 1, total_steps)
        if not wait_until(attempt, lambda: steps_logged(attempt.run_dir) >= target_step - 1,
                          poll_seconds=STDERR_POLL_SECONDS):
            return None
        if not sleep_while_running(attempt, rng.uniform(0, reference.seconds_per_step)):
            return None
        return kill_now(attempt, kind, f"step {target_step}")
    saves = upcoming_saves(reference, total_steps, start_step)
    save_kind = rng.choices(list(saves), weights=[{"step": 3, "best": 1, "final": 1}[k] for k in saves])[0]
    target = rng.choice(saves[save_kind])
    writing = attempt.run_dir / f"{target}.tmp"
    if not wait_until(attempt, lambda: attempt.fresh(writing)):
        return None
    time.sleep(rng.uniform(0, 1.2 * reference.save_seconds[save_kind]))
    return kill_now(attempt, kind, target)


# ---------------------------------------------------------------------------------------------
# The reference run, watched for its timings.

def save_lifetimes(attempt: Attempt) -> dict[str, list[float]]:
    """Poll the run directory until the process ends: how long each <name>.tmp folder was seen."""
    seen: dict[str, float] = {}
    lifetimes: dict[str, list[float]] = {"step": [], "best": [], "final": []}
    while attempt.process.poll() is None:
        now = time.monotonic()
        current = {p.name for p in attempt.run_dir.glob("*.tmp")} if attempt.run_dir.is_dir() else set()
        for name in current - seen.keys():
            seen[name] = now
        for name in [n for n in seen if n not in current]:
            kind = name.removesuffix(".tmp").split("-")[0]
            lifetimes.setdefault(kind, []).append(now - seen.pop(name))
        time.sleep(POLL_SECONDS)
    return lifetimes


def reference_run(config: Path, work: Path, env: dict, total_steps: int) -> Reference:
    run_dir = work / "reference"
    attempt = launch(config, run_dir, False, work / "logs" / "reference", env)
    wait_until(attempt, attempt.training, poll_seconds=STDERR_POLL_SECONDS)
    startup_seconds = time.monotonic() - attempt.launched
    lifetimes = save_lifetimes(attempt)
    wall_seconds = time.monotonic() - attempt.launched
    if attempt.process.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{attempt.stderr()[-3000:]}")
    train_seconds = (run_dir / "final").stat().st_mtime - attempt.launched_wall - startup_seconds
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_steps, best = [], float("inf")
    for record in records:
        if "val_loss" in record and record["val_loss"] < best:
            best_steps, best = best_steps + [record["step"]], record["val_loss"]
    save_seconds = {kind: max(values) if values else 0.01 for kind, values in lifetimes.items()}
    return Reference(run_dir, startup_seconds, train_seconds / total_steps, save_seconds, best_steps,
                     wall_seconds)


# ---------------------------------------------------------------------------------------------
# One chaos run: kill, resume, repeat, then compare with the reference.

@dataclass
class RunResult:
    index: int
    kills: list[Kill] = field(default_factory=list)
    resumed_from: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # resumes that refused or crashed (first line)
    lost: list[str] = field(default_factory=list)
    went_back: list[str] = field(default_factory=list)  # resumed from older than the newest complete
    finished: bool = False
    final_identical: bool = False
    best_identical: bool = False
    metrics_intact: bool = False
    leftovers: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


def plan_kills(rng: random.Random) -> list[str]:
    kinds = []
    for number in range(rng.randint(1, MAX_KILLS)):
        choices = ["step", "checkpoint"] + (["start-up"] if number else [])  # the first attempt has no checkpoint yet
        kinds.append(rng.choices(choices, weights=[4, 5, 1][: len(choices)])[0])
    return kinds


def check_resume(result: RunResult, attempt: Attempt, states_at_kill: dict[str, str]) -> None:
    """A resume must start from the newest step-* folder that was complete (or recoverable) at the kill."""
    name, _ = attempt.resumed_at()
    if name is None:
        return
    result.resumed_from.append(name)
    usable = sorted(n for n, s in states_at_kill.items() if n.startswith("step-") and s in USABLE)
    if usable and name < usable[-1]:
        result.went_back.append(f"resumed from {name}, {usable[-1]} was there")


def note_failure(result: RunResult, attempt: Attempt) -> None:
    errors = [line for line in attempt.stderr().splitlines() if line.startswith(("tunesmith:", "Traceback"))
              or "Error" in line]
    code = attempt.process.returncode
    result.failures.append(f"exit {code}: {errors[-1] if errors else attempt.stderr()[-300:]}")


def chaos_run(index: int, seed: int, config: Path, work: Path, env: dict, reference: Reference,
              total_steps: int) -> RunResult:
    result, run_dir = RunResult(index), work / "runs" / f"run-{index:02d}"
    rng = random.Random(f"{seed}-{index}")  # each run's plan stands alone, whatever the others did
    started = time.monotonic()
    plan = plan_kills(rng)
    last_states: dict[str, str] = {}
    for number in range(len(plan) + 2):  # every planned kill, the finishing attempt, one retry
        attempt = launch(config, run_dir, number > 0, work / "logs" / f"run-{index:02d}-{number}", env)
        kill = staged_kill(attempt, plan[number], rng, reference, total_steps, number == 0) \
            if number < len(plan) else None
        if kill is None:
            attempt.process.wait(timeout=ATTEMPT_TIMEOUT_SECONDS)
        if number > 0:
            check_resume(result, attempt, last_states)
        states = kill.before if kill else checkpoint_states(run_dir)
        result.lost += lost_between(last_states, states) + (lost_between(kill.before, kill.after) if kill else [])
        last_states = kill.after if kill else states
        if kill is not None:
            result.kills.append(kill)
            continue
        if attempt.process.returncode == 0:
            result.finished = True
            break
        note_failure(result, attempt)
    result.wall_seconds = time.monotonic() - started
    if result.finished:
        compare(result, run_dir, reference.run_dir, total_steps)
    return result


def same_bits(ours: Path, theirs: Path) -> bool:
    """Every adapter tensor equal bit for bit (not merely ==, which takes -0.0 for 0.0)."""
    if not (ours / ADAPTER).is_file():
        return False
    mine, reference = load_file(str(ours / ADAPTER)), load_file(str(theirs / ADAPTER))
    if mine.keys() != reference.keys():
        return False
    return all(mine[k].dtype == reference[k].dtype and mine[k].shape == reference[k].shape
               and torch.equal(mine[k].reshape(-1).view(torch.uint8), reference[k].reshape(-1).view(torch.uint8))
               for k in mine)


def trainer_step(folder: Path, key: str = "step"):
    return json.loads((folder / "trainer_state.json").read_text()).get(key)


def compare(result: RunResult, run_dir: Path, reference_dir: Path, total_steps: int) -> None:
    result.final_identical = same_bits(run_dir / "final", reference_dir / "final") and \
        trainer_step(run_dir / "final") == trainer_step(reference_dir / "final") == total_steps
    result.best_identical = same_bits(run_dir / "best", reference_dir / "best") and \
        trainer_step(run_dir / "best") == trainer_step(reference_dir / "best")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result.metrics_intact = [r["step"] for r in records if "loss" in r] == list(range(1, total_steps + 1))
    result.leftovers = sorted(p.name for p in run_dir.iterdir() if is_checkpoint_name(p.name)
                              and (p.name.endswith((".tmp", ".old")) or not checkpoint.is_complete(p)))


# ---------------------------------------------------------------------------------------------
# Report.

def run_line(result: RunResult) -> str:
    kills = ", ".join(f"{k.phase} ({k.target})" for k in result.kills) or "none"
    final = "identical" if result.final_identical else ("DIFFERENT" if result.finished else "NOT FINISHED")
    problems = result.lost + result.failures + result.went_back + [f"left {n}" for n in result.leftovers]
    return (f"| {result.index} | {kills} | {', '.join(result.resumed_from) or '-'} | {final} | "
            f"{'identical' if result.best_identical else 'different'} | {'; '.join(problems) or '-'} | "
            f"{result.wall_seconds:.0f} |")


def machine_line() -> str:
    cpu = cpu_model()
    return f"- Machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}"


def summary_lines(results: list[RunResult], reference: Reference, wall_seconds: float) -> list[str]:
    runs = len(results)
    everyone = f"{runs}/{runs}"
    resumes = sum(len(r.kills) for r in results)  # each kill is followed by a resume
    mean_run_seconds = sum(r.wall_seconds for r in results) / max(runs, 1)
    wall = (f"{wall_seconds / 60:.1f} min (reference run {reference.wall_seconds:.0f} s, "
            f"a chaos run {mean_run_seconds:.0f} s on average)")
    rows = [("final/ adapters bitwise identical to the reference's",
             f"{sum(r.final_identical for r in results)}/{runs}", everyone),
            ("checkpoints lost", sum(len(r.lost) for r in results), 0),
            ("resumes that refused or crashed", f"{sum(len(r.failures) for r in results)} of {resumes}", 0),
            ("resumes that went back past the newest complete step-*", sum(len(r.went_back) for r in results), 0),
            ("best/ bitwise identical to the reference's", f"{sum(r.best_identical for r in results)}/{runs}",
             everyone),
            ("metrics.jsonl with every step exactly once", f"{sum(r.metrics_intact for r in results)}/{runs}",
             everyone),
            ("runs with leftover folders at the end (*.tmp, *.old, half-pruned step-*)",
             sum(bool(r.leftovers) for r in results), 0),
            ("SIGKILLs", sum(len(r.kills) for r in results), ""),
            ("wall time", wall, "")]
    return ["| measure | result | target |", "|---|---:|---:|",
            *[f"| {name} | {value} | {target} |" for name, value, target in rows]]


NOTES = [
    ("- A kill is SIGSTOP, a look at the phase and the checkpoints on disk, then SIGKILL. A checkpoint is lost "
     "when it verified (or recover() could put it back from <name>.tmp/.old) at one look and is missing or fails "
     "its manifest at a later look (at the next kill, or when the run has finished); step-* folders are exempt "
     "once save_total_limit newer complete ones exist (pruning)."),
    ("- The kill plan is seeded; the exact moment depends on timing, so phases vary between runs of the bench. "
     "CPU kernels here are deterministic, which is what makes a bitwise comparison possible."),
]


def setup_lines(reference: Reference, args) -> list[str]:
    saves = ", ".join(f"{kind} {seconds * 1000:.0f} ms" for kind, seconds in reference.save_seconds.items())
    work = (f"tiny random llama (tests/tiny.py, 2 layers, hidden 64), LoRA r={LORA_RANK} dropout 0.05, "
            f"{args.steps} steps of 4 examples (2 micro batches of 2), fp32 on the CPU, {ROWS} generated "
            f"question/answer rows; a step-* checkpoint every {SAVE_INTERVAL} steps ({KEEP} kept), validation "
            f"every {EVAL_INTERVAL} (best/ when it improves: steps {reference.best_steps} in the reference)")
    chaos = (f"{args.runs} runs, each killed with SIGKILL 1-{MAX_KILLS} times (seed {args.seed}) and resumed with "
             "`tunesmith finetune run.yaml --resume` until it finished; one uninterrupted reference run")
    timings = (f"start-up {reference.startup_seconds:.1f} s, {reference.seconds_per_step * 1000:.0f} ms per "
               f"step, longest save ({saves})")
    return [machine_line(), f"- Code: {code_version()}", f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- Command: `{shown_command()}`", f"- Work: {work}", f"- Chaos: {chaos}",
            f"- Reference timings that size the random delays: {timings}"]


def report(results: list[RunResult], reference: Reference, args, wall_seconds: float) -> list[str]:
    kills = [k for r in results for k in r.kills]
    phases = Counter(k.phase for k in kills)
    aimed = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(k.kind for k in kills).items()))
    return ["## Kill and resume: SIGKILL at random moments (bench/chaos_resume.py)", "",
            *setup_lines(reference, args), "",
            *summary_lines(results, reference, wall_seconds), "",
            f"Where the kills landed (aimed at: {aimed}):", "",
            "| phase | kills |", "|---|---:|",
            *[f"| {PHASES[p]} | {phases.get(p, 0)} |" for p in PHASES], "",
            "| run | kills (phase, aimed at) | resumed from | final/ | best/ | problems | wall s |",
            "|---:|---|---|---|---|---|---:|",
            *[run_line(r) for r in results], "",
            "Notes:", *NOTES]


def code_version() -> str:
    """The commit the runs used, and whether tunesmith/ had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    return commit + (" with uncommitted changes in tunesmith/" if git("status", "--porcelain", "tunesmith") else "")


def shown_command() -> str:
    python = Path(sys.executable)
    try:
        shown = python.relative_to(Path.cwd())
    except ValueError:
        shown = python
    return " ".join([str(shown), *sys.argv])


def write_results(path: Path, section: list[str]) -> None:
    from results_md import write_section  # bench/ is on the path of a script run from it

    write_section(path, "chaos_resume", section)


# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="killed-and-resumed runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan, the model and the data")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every run")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "chaos_resume")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown file --write updates")
    parser.add_argument("--write", action="store_true", help="write the section into --results")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.steps < 3 * SAVE_INTERVAL:
        parser.error(f"--steps must be at least {3 * SAVE_INTERVAL}: kills come after the first checkpoint")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)  # only this script's folder
    (work / "logs").mkdir(parents=True)
    config = make_inputs(work, args.seed, args.steps)
    env = child_env(private_cache(work))
    print(f"Reference run ({args.steps} steps) ...", file=sys.stderr, flush=True)
    reference = reference_run(config, work, env, args.steps)
    results = []
    for index in range(1, args.runs + 1):
        result = chaos_run(index, args.seed, config, work, env, reference, args.steps)
        print(run_line(result), file=sys.stderr, flush=True)
        results.append(result)
    lines = report(results, reference, args, time.monotonic() - started)
    print("\n".join(lines))
    if args.write:
        write_results(args.results, lines)
        print(f"\nWrote {args.results}", file=sys.stderr)
    ok = all(r.final_identical and not r.lost and not r.failures and not r.went_back for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
