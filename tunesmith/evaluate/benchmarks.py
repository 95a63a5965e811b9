"""Standard benchmarks (ARC, HellaSwag, MMLU, TruthfulQA, ...) through lm-evaluation-harness,
run on the model tunesmith already loaded (base, or tuned with its adapter merged), so base and
tuned are scored by the same code on the same examples.

Offline use: lm-eval reads each task's data with `datasets`. Built-in tasks work without a
network when their data sets are already in the Hugging Face cache (HF_DATASETS_OFFLINE=1); a
task of your own is a YAML file in eval.tasks_dir whose data are local files, e.g.

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: label
    metric_list: [{metric: acc}]
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.infer.generate import Loaded

# Metric keys lm-eval reports that are not scores (standard errors, names).
_NOT_SCORES = ("_stderr", "alias", "name", "sample_len", "sample_count")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("eval.tasks needs lm-evaluation-harness: pip install 'tunesmith[benchmarks]'") from None


def check_tasks(config: RunConfig) -> None:
    """Refuse unknown eval.tasks before anything is prepared or loaded (the index is kept for the run)."""
    _require_lm_eval()
    task_manager(tuple(config.eval.tasks), config.eval.tasks_dir)


@functools.lru_cache(maxsize=4)
def task_manager(tasks: tuple[str, ...], tasks_dir: str | None):
    """Tasks from eval.tasks_dir first; lm-eval's ~15,000 built-in tasks are indexed (tens of
    seconds) only when a requested task is not found there."""
    from lm_eval.tasks import TaskManager

    if tasks_dir:
        if not Path(tasks_dir).is_dir():
            raise ConfigError(f"eval.tasks_dir: {tasks_dir} is not a folder of task YAML files")
        local = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        problems = []
        for task in unknown:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"eval.tasks: unknown lm-eval task {task!r}{hint}")
        raise ConfigError(problems)
    return manager


def run_tasks(loaded: Loaded, config: RunConfig) -> dict[str, dict[str, float]]:
    """task → {metric: value} for one loaded model; metric names as lm-eval gives them (acc, acc_norm)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tuple(config.eval.tasks), config.eval.tasks_dir)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=config.eval.fixed_batch,
                 device=str(loaded.device))
    try:
        output = simple_evaluate(model=model, tasks=list(config.eval.tasks), task_manager=manager,
                                 limit=config.eval.tasks_limit, num_fewshot=config.eval.tasks_fewshot,
                                 bootstrap_iters=0, log_samples=False, random_seed=config.train.seed,
                                 numpy_random_seed=config.train.seed, torch_random_seed=config.train.seed,
                                 fewshot_random_seed=config.train.seed)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        raise TunesmithError(_data_missing(config.eval.tasks, err)) from None
    return scores(output, config.eval.tasks)


def _data_missing(tasks: list[str], err: Exception) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"benchmark data for {', '.join(tasks)} could not be loaded ({first[:200]}); offline, the data "
            "sets must already be in the Hugging Face cache (HF_DATASETS_OFFLINE=1), or define the task on "
            "local files in eval.tasks_dir (see README, Benchmarks)")


def scores(output: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    """The requested tasks' (or groups') scores; 'acc,none' becomes 'acc' (the unfiltered result)."""
    found = {**output.get("results", {}), **output.get("groups", {})}
    table = {}
    for task in tasks:
        metrics = found.get(task, {})
        table[task] = {_metric_name(key): float(value) for key, value in metrics.items()
                       if isinstance(value, (int, float)) and not any(part in key for part in _NOT_SCORES)}
    return table


def _metric_name(key: str) -> str:
    name, _, filtered = key.partition(",")
    return name if filtered in ("", "none") else f"{name} ({filtered})"


def table_rows(benchmarks: dict) -> tuple[list[str], list[list[str]]]:
    labels = list(benchmarks)
    header = ["task", "metric", *labels] + (["change"] if len(labels) == 2 else [])
    rows = []
    first = benchmarks[labels[0]]
    for task in first:
        for metric in first[task]:
            values = [benchmarks[label].get(task, {}).get(metric) for label in labels]
            row = [task, metric] + ["—" if v is None else f"{v:.4f}" for v in values]
            if len(labels) == 2 and None not in values:
                row.append(f"{values[1] - values[0]:+.4f}")
            elif len(labels) == 2:
                row.append("—")
            rows.append(row)
    return header, rows


def write(folder: Path, benchmarks: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "benchmarks.json").write_text(json.dumps(benchmarks, indent=2))
    header, rows = table_rows(benchmarks)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (folder / "benchmarks.md").write_text("\n".join(lines) + "\n")


def print_table(benchmarks: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(benchmarks)
    table = Table(title="Benchmarks (lm-evaluation-harness)")
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
