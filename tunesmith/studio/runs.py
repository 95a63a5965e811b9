"""What the studio shows of a run directory, read as it is on disk: status, headline numbers, the
curves from metrics.jsonl (as it grows, a damaged line skipped and named), the diagnosis, the
evaluation, and the CLI commands for each thing the page can do with it."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import yaml

from tunesmith import locks
from tunesmith.studio.jobs import Job, Jobs, alive
from tunesmith.train import checkpoint

CURVE_KEYS = ("loss", "val_loss", "lr", "tokens_per_second", "reward_accuracy", "val_reward_accuracy")


class RunNotFound(LookupError):
    pass


def run_dir(root: Path, name: str) -> Path:
    """`name` as a run folder directly under root; nothing that climbs out of it."""
    folder = (root / name).resolve()
    if not name or folder.parent != root.resolve() or name.startswith("."):
        raise RunNotFound(f"{name!r} is not a run under {root}")
    if not folder.is_dir():
        raise RunNotFound(f"no run {name!r} under {root} (deleted, or never started)")
    return folder


def names(root: Path, jobs: Jobs) -> list[str]:
    """Folders with a config.yaml, and runs the studio started that have no folder yet (starting)
    or never will (failed before their data was read). A deleted run is gone from the list."""
    found = {p.parent.name for p in root.glob("*/config.yaml") if not p.parent.name.startswith(".")}
    found |= {job.run for job in jobs.all() if job.verb == "finetune" and folderless(root, job.run, jobs)}
    return sorted(found)


def folderless(root: Path, name: str, jobs: Jobs) -> bool:
    """A run the studio shows without a folder: its training job is still starting, or it failed."""
    job = jobs.latest(name, "finetune")
    return not (root / name).is_dir() and job is not None and (alive(job) or job.error is not None)


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """The records, and a note per damaged line (a half-written last line is simply not there yet)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return [], []
    records, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number < len(lines):
            problems.append(f"{path.name} line {number} is not a JSON record; skipped")
    return records, problems


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_config(folder: Path) -> dict:
    try:
        loaded = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def status(folder: Path | None, job: Job | None) -> tuple[str, str | None]:
    """(starting | running | finished | failed | interrupted | stopped, the error if it failed).
    Running means a process holds the run's training lock, whoever started it."""
    training = folder is not None and locks.training_pid(folder) is not None
    if training:
        return "running", None
    if job is not None and alive(job):
        return "starting", None  # reading data, loading the model; or an evaluate / export at work
    if folder is not None and (folder / "final").is_dir():
        return "finished", None
    if job is not None and job.error:
        return "failed", job.error
    if folder is not None and checkpoint.step_folders(folder):
        return "interrupted", None
    return "stopped", None


def summary(root: Path, name: str, jobs: Jobs, records: list[dict] | None = None) -> dict:
    folder = root / name if (root / name).is_dir() else None
    job = jobs.latest(name, "finetune")
    state, error = status(folder, job)
    config = read_config(folder) if folder else {}
    if records is None:
        records = read_metrics(folder / "metrics.jsonl")[0] if folder else []
    steps = [r["step"] for r in records if "loss" in r and isinstance(r.get("step"), int)]
    val = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    return {"name": name, "status": state, "error": error, "method": config.get("method", "lora"),
            "model": config.get("model"), "data": (config.get("data") or {}).get("path"),
            "step": max(steps, default=0), "max_steps": (config.get("train") or {}).get("max_steps"),
            "best_val_loss": min(val, default=None), "evaluation": headline(folder) if folder else None,
            "resumable": state == "interrupted"}


def headline(folder: Path) -> str | None:
    """One line of the evaluation: exact match (or test loss) base → tuned."""
    results = read_json(folder / "eval" / "results.json")
    if not isinstance(results, dict) or not results:
        return None
    for key, show in (("exact_match", lambda v: f"{100 * v:.1f}%"), ("preference_accuracy", lambda v: f"{100 * v:.1f}%"),
                      ("test_loss", lambda v: f"{v:.3f}")):
        values = [(label, r.get(key)) for label, r in results.items() if isinstance(r, dict)]
        if all(isinstance(v, (int, float)) for _, v in values):
            return f"{key.replace('_', ' ')} " + " → ".join(f"{show(v)} ({label})" for label, v in values)
    return None


def detail(root: Path, name: str, jobs: Jobs) -> dict:
    folder = root / name
    records, problems = read_metrics(folder / "metrics.jsonl")  # read once: the summary and the curves
    info = summary(root, name, jobs, records)
    if not folder.is_dir():
        job = jobs.latest(name, "finetune")
        return {**info, "curves": {}, "problems": [], "config": {}, "diagnosis": None, "results": None,
                "errors": None, "commands": {}, "log": jobs.log_tail(job) if job else ""}
    latest = jobs.latest(name)
    return {**info, "curves": curves(records), "problems": problems, "config": read_config(folder),
            "diagnosis": diagnosis(records), "results": read_json(folder / "eval" / "results.json"),
            "errors": read_json(folder / "eval" / "errors.json"), "export": exports(folder),
            "commands": commands(folder), "log": jobs.log_tail(latest) if latest else "",
            "job": {"verb": latest.verb, "command": latest.command, "running": alive(latest),
                    "exit_code": latest.exit_code, "error": latest.error} if latest else None}


def curves(records: list[dict]) -> dict[str, list[list[float]]]:
    """key → [[step, value], ...] for the page's charts."""
    out: dict[str, list[list[float]]] = {}
    for record in records:
        step = record.get("step")
        for key in CURVE_KEYS:
            value = record.get(key)
            if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(key, []).append([step, value])
    return out


def diagnosis(records: list[dict]) -> dict | None:
    from tunesmith.evaluate.diagnose import diagnose

    if not any("loss" in r for r in records):
        return None
    try:
        found = diagnose(records)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # too few or odd records to judge yet
    return {"verdict": found.verdict, "headline": found.headline, "findings": found.findings,
            "advice": found.advice}


def exports(folder: Path) -> list[dict]:
    """Each export folder's file and the check of it in llama.cpp."""
    found = []
    for info_path in sorted(folder.glob("export*/export.json")):
        info = read_json(info_path) or {}
        check = info.get("check") or {}
        found.append({"folder": info_path.parent.name, "file": info.get("file"), "type": info.get("type"),
                      "agreement": check.get("agreement"), "prompts": check.get("prompts"),
                      "same_answers": check.get("same_answers")})
    return found


def commands(folder: Path) -> dict[str, str]:
    """The CLI for everything the page does with this run."""
    run = shlex.quote(str(folder))
    return {"resume": f"tunesmith finetune {run} --resume", "evaluate": f"tunesmith evaluate {run}",
            "report": f"tunesmith report {run}", "chat": f"tunesmith chat --run {run}",
            "merge": f"tunesmith merge {run}", "export": f"tunesmith export {run} --format gguf --type q8_0"}
