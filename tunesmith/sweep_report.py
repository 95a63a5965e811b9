"""What a sweep writes when it ends: the table (printed, trials.csv, summary.md), plots/sweep.png,
and best.yaml, the complete config of the best trial. Everything is read from the study, so a
worker on one machine reports the trials of every machine."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tunesmith import config as config_module
from tunesmith.sweep_space import Space, with_values, yaml_text

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def trial_rows(study, space: Space) -> list[dict]:
    """One row per trial of the study, in trial order (surplus trials, never run, left out)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    return [_row(t, space, retried_as.get(t.number)) for t in trials]


def _row(trial, space: Space, retried_as: int | None) -> dict:
    finite = {step: v for step, v in trial.intermediate_values.items() if math.isfinite(v)}
    best_step = min(finite, key=finite.get) if finite else None
    state = STATE_NAMES.get(trial.state.name, trial.state.name.lower())
    end = trial.datetime_complete or (datetime.now() if trial.state.name == "RUNNING" else None)
    notes = []
    if trial.state.name == "FAIL" and retried_as is not None:
        state = "interrupted"
        notes.append(f"retried as trial {retried_as}")
    if "retry_of" in trial.user_attrs:
        notes.append(f"retry of trial {trial.user_attrs['retry_of']}")
    if trial.state.name == "PRUNED" and trial.last_step is not None:
        notes.append(f"pruned at step {trial.last_step}")
    if trial.user_attrs.get("error"):
        notes.append(trial.user_attrs["error"])
    params = {p.key: p.value_of(trial.params[p.key]) for p in space.params if p.key in trial.params}
    return {"trial": trial.number, "params": params, "best_val_loss": finite.get(best_step),
            "best_step": best_step, "state": state,
            "seconds": (end - trial.datetime_start).total_seconds() if end and trial.datetime_start else None,
            "run_dir": trial.user_attrs.get("run_dir", ""), "host": trial.user_attrs.get("host", ""),
            "note": "; ".join(notes), "value": trial.value if trial.state.name == "COMPLETE" else None,
            "score": trial.user_attrs.get("score")}


def best_row(rows: list[dict]) -> dict | None:
    complete = [r for r in rows if r["value"] is not None]
    return min(complete, key=lambda r: r["value"]) if complete else None


def _cells(row: dict, space: Space) -> list[str]:
    params = [_show(row["params"].get(p.key, "")) for p in space.params]
    loss = "" if row["best_val_loss"] is None else f"{row['best_val_loss']:.4f}"
    score = ["" if row["score"] is None else f"{row['score']:.4f}"] if space.scored else []
    seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
    return [str(row["trial"]), *params, *score, loss, row["state"], seconds, row["note"]]


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return yaml_text(value) if isinstance(value, list) else str(value)


def describe(values: dict) -> str:
    return ", ".join(f"{key}={_show(value)}" for key, value in values.items())


def header(space: Space) -> list[str]:
    score = [space.metric] if space.scored else []
    return ["trial", *(p.key for p in space.params), *score, "best val loss", "state", "seconds", "note"]


def ranked_by(space: Space) -> str:
    if space.scored:
        return f"by the {space.metric} `evaluate` gives the trained model on the test split (highest first)"
    return "by the lowest validation loss they reached"


def best_words(best: dict, space: Space) -> str:
    loss = f"validation loss {best['best_val_loss']:.4f} at step {best['best_step']}"
    return f"{space.metric} {best['score']:.4f} ({loss})" if space.scored else loss


def print_table(rows: list[dict], space: Space, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in header(space):
        table.add_column(name, justify="left" if name in ("state", "note") else "right")
    best = best_row(rows)
    for row in rows:
        table.add_row(*_cells(row, space), style="bold" if row is best else None)
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # piped: no squeezed columns


def write_csv(path: Path, rows: list[dict], space: Space) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    score = [space.metric] if space.scored else []
    writer.writerow(["trial", *(p.key for p in space.params), *score, "best_val_loss", "best_step", "state",
                     "seconds", "run_dir", "host", "note"])
    for row in rows:
        scored = ["" if row["score"] is None else repr(row["score"])] if space.scored else []
        writer.writerow([row["trial"], *(_csv_value(row["params"].get(p.key, "")) for p in space.params), *scored,
                         "" if row["best_val_loss"] is None else repr(row["best_val_loss"]),
                         "" if row["best_step"] is None else row["best_step"], row["state"],
                         "" if row["seconds"] is None else f"{row['seconds']:.1f}", row["run_dir"], row["host"],
                         row["note"]])
    write_atomic(path, buffer.getvalue())


def _csv_value(value) -> str:
    return yaml_text(value) if isinstance(value, list) else str(value)


def write_summary(path: Path, rows: list[dict], space: Space, lines: list[str], importances: dict | None) -> None:
    names = header(space)
    best = best_row(rows)
    text = [f"# Sweep {path.parent.name}", "", *lines, "",
            "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = [cell.replace("|", "\\|") for cell in _cells(row, space)]
        text.append("| " + " | ".join(f"**{c}**" if row is best and c else c for c in cells) + " |")
    measure = space.metric if space.scored else "validation loss"
    if importances and len(importances) > 1:
        text += ["", f"Importance of each key (share of the variation in {measure} it explains): "
                 + ", ".join(f"{key} {share:.2f}" for key, share in importances.items())]
    text += ["", f"![{measure} per trial](plots/sweep.png)", ""]
    write_atomic(path, "\n".join(text))


def write_best(path: Path, best: dict, base_raw: dict, sweep_dir: Path, space: Space) -> None:
    """The base config with the best trial's values: complete (every key), runnable by finetune."""
    raw = with_values(base_raw, best["params"])
    config = config_module.build({**raw, "out_dir": None, "name": f"{sweep_dir.name}-best"})
    text = (f"# Best trial of the sweep in {sweep_dir}: trial {best['trial']}, {best_words(best, space)}\n"
            f"# with {describe(best['params'])}\n"
            f"# Train it: tunesmith finetune {path}\n" + config_module.dump(config))
    write_atomic(path, text)


def importances(study, space: Space) -> dict | None:
    """Each key's share of the variation in what trials are ranked by (Optuna's default evaluator), best first."""
    if len(space.params) == 1:
        return {space.params[0].key: 1.0}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3:
        return None
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(optuna.importance.get_param_importances(study))
        except (ValueError, RuntimeError):
            return None


def plot(path: Path, rows: list[dict], space: Space, importances: dict | None) -> Path | None:
    """What trials are ranked by (best validation loss, or the score), per trial with the best so far,
    and against the most important key."""
    measure = Measure("score", space.metric, max) if space.scored else Measure("best_val_loss", "best validation loss", min)
    ranked = [r for r in rows if r[measure.key] is not None]
    if not ranked:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(iter(importances)) if importances else space.params[0].key
    figure, (by_trial, by_value) = plt.subplots(1, 2, figsize=(11, 4))
    _per_trial(by_trial, ranked, measure)
    _against(by_value, ranked, next(p for p in space.params if p.key == key), measure)
    if importances and len(importances) > 1:
        by_value.set_title(f"the most important key: {key} ({importances[key]:.0%} of the variation)",
                           fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return path


MARKERS = {"complete": "o", "pruned": "x", "running": ".", "interrupted": ".", "failed": "."}


@dataclass(frozen=True)
class Measure:
    key: str  # the row's field
    label: str
    best: Callable  # min or max


def _per_trial(axes, rows: list[dict], measure: Measure) -> None:
    from matplotlib.ticker import MaxNLocator

    for state, marker in MARKERS.items():
        chosen = [r for r in rows if r["state"] == state]
        if chosen:
            axes.plot([r["trial"] for r in chosen], [r[measure.key] for r in chosen], marker,
                      linestyle="", label=state)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    complete = sorted((r for r in rows if r["value"] is not None), key=lambda r: r["trial"])
    if complete:
        running_best = [measure.best(r[measure.key] for r in complete[: i + 1]) for i in range(len(complete))]
        axes.step([r["trial"] for r in complete], running_best, where="post", alpha=0.6, label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(measure.label)
    axes.grid(alpha=0.3)
    axes.legend()


def _against(axes, rows: list[dict], param, measure: Measure) -> None:
    rows = [r for r in rows if param.key in r["params"]]
    numeric = all(isinstance(r["params"][param.key], (int, float)) and not isinstance(r["params"][param.key], bool)
                  for r in rows)
    labels = [_show(c) for c in (param.choices or ())]
    for state, marker in MARKERS.items():
        chosen = [r for r in rows if r["state"] == state]
        values = [r["params"][param.key] for r in chosen]
        # choices that are not numbers: one column each, in the file's order
        positions = values if numeric else [labels.index(_show(v)) for v in values]
        if chosen:
            axes.plot(positions, [r[measure.key] for r in chosen], marker, linestyle="", label=state)
    spread = [r["params"][param.key] for r in rows] if numeric else []
    if numeric and (param.log or (spread and min(spread) > 0 and max(spread) >= 10 * min(spread))):
        axes.set_xscale("log")  # choices such as [1e-5, 5e-5, 2e-4] too: linear ticks would overlap
    if not numeric:
        axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel(param.key)
    axes.set_ylabel(measure.label)
    axes.grid(alpha=0.3)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
