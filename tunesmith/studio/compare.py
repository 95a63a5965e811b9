"""Two or more runs side by side: what their configs set differently, their evaluations, and the
held-out rows answered by the base model and by each run, filtered to failures or regressions."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.studio.runs import read_config, read_json

MAX_ROWS = 300
FILTERS = ("all", "failures", "regressions")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(folders: list[Path]) -> list[dict]:
    """Keys whose values differ between the runs (out_dir and name always do, so left out). A key a
    run's config.yaml lacks (written by an older tunesmith) has its default, as when it ran."""
    from tunesmith.config import RunConfig

    defaults = flatten(RunConfig().model_dump(mode="json"))
    flat = [{**defaults, **flatten(read_config(folder))} for folder in folders]
    keys = sorted(set().union(*flat) - {"out_dir", "name"})
    rows = []
    for key in keys:
        values = [f.get(key) for f in flat]
        if any(v != values[0] for v in values):
            rows.append({"key": key, "values": values})
    return rows


def predictions(folder: Path) -> dict[str, dict]:
    """The run's per-row evaluation, by the row's content (prompt and reference): runs trained from
    copies of one file in different places still line up."""
    rows = {}
    try:
        lines = (folder / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "prompt" in record:
            rows[json.dumps([record["prompt"], record.get("reference")], sort_keys=True)] = record
    return rows


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def answers(folders: list[Path], which: str = "all") -> dict:
    """Rows every evaluated run answered: the base answer (the first run's), each run's, right or not."""
    per_run = [predictions(folder) for folder in folders]
    evaluated = [p for p in per_run if p]
    shared = [k for k in evaluated[0] if all(k in p for p in evaluated)] if evaluated else []
    rows = []
    for key in shared:
        first = evaluated[0][key]
        runs = [{"answer": p[key].get("tuned"), "right": p[key].get("tuned_exact_match") == 1}
                if p else None for p in per_run]
        base_right = first.get("base_exact_match") == 1
        wrong = [r for r in runs if r is not None and not r["right"]]
        if which == "failures" and not wrong:
            continue
        if which == "regressions" and not (base_right and wrong):
            continue
        rows.append({"where": first.get("where"), "prompt": _prompt_text(first.get("prompt")), "reference": first.get("reference"),
                     "base": first.get("base"), "base_right": base_right, "runs": runs})
    return {"rows": rows[:MAX_ROWS], "total": len(rows), "shared": len(shared),
            "not_evaluated": [folder.name for folder, p in zip(folders, per_run) if not p]}


def compare(folders: list[Path], which: str = "all") -> dict:
    return {"runs": [folder.name for folder in folders], "differences": config_differences(folders),
            "results": [read_json(folder / "eval" / "results.json") for folder in folders],
            **answers(folders, which)}
