"""k-fold cross-validation (data.folds: k): the same run trained k times, each fold validating
on a different part of the rows, then the mean and spread of the validation loss.

    out/<run>/fold-1/ ... fold-k/   complete run directories (config, metrics, checkpoints)
    out/<run>/cv.json               per fold: final and best validation loss; mean, std, min, max

The test split is taken out first and is the same for every fold.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tunesmith.config import RunConfig, dump
from tunesmith.log import say
from tunesmith.train.metrics import read


def fold_configs(config: RunConfig) -> list[RunConfig]:
    """One config per fold, each with its own run directory; the config itself without folds."""
    data = config.data
    if data.folds <= 1 or data.fold > 0:
        return [config]
    return [config.model_copy(update={"out_dir": str(config.run_dir / f"fold-{i}"),
                                      "data": data.model_copy(update={"fold": i})})
            for i in range(1, data.folds + 1)]


def fold_result(run_dir: Path) -> dict:
    """A finished fold's final validation loss (the pass at the last step) and its best one."""
    records = read(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    val = [r for r in records if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    return {"run_dir": str(run_dir), "final_val_loss": val[-1]["val_loss"] if val else None,
            "final_step": val[-1]["step"] if val else None,
            "best_val_loss": best["val_loss"] if best else None, "best_step": best["step"] if best else None}


def summarize(results: list[dict], key: str) -> dict | None:
    values = [r[key] for r in results if r[key] is not None]
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "min": min(values), "max": max(values),
            "folds": len(values)}


def describe(summary: dict) -> list[str]:
    lines = []
    final, best = summary["final_val_loss"], summary["best_val_loss"]
    if final:
        lines.append(f"Cross-validation over {summary['k']} folds: validation loss {final['mean']:.4f} "
                     f"± {final['std']:.4f} (mean ± std; min {final['min']:.4f}, max {final['max']:.4f})")
    if best:
        lines.append(f"  best checkpoint per fold: {best['mean']:.4f} ± {best['std']:.4f}")
    for number, fold in enumerate(summary["per_fold"], start=1):
        if fold["final_val_loss"] is not None:
            lines.append(f"  fold {number}: {fold['final_val_loss']:.4f} at step {fold['final_step']} "
                         f"(best {fold['best_val_loss']:.4f} at step {fold['best_step']})  {fold['run_dir']}")
    return lines


def run_folds(config: RunConfig, train_one) -> int:
    """Train every fold in turn with `train_one(config) -> exit code`, then report and write cv.json."""
    configs = fold_configs(config)
    window = config.train.eval_iters * config.train.micro_batch_size
    say(f"k-fold cross-validation: {len(configs)} runs in {config.run_dir}/fold-1 .. fold-{len(configs)} "
        f"(each validation pass reads up to {window} rows: train.eval_iters x micro_batch_size)")
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.yaml").write_text(dump(config))
    for number, fold_config in enumerate(configs, start=1):
        say(f"--- fold {number} of {len(configs)} ---")
        code = train_one(fold_config)
        if code:
            return code
    results = [fold_result(c.run_dir) for c in configs]
    summary = {"k": len(configs), "per_fold": results,
               "final_val_loss": summarize(results, "final_val_loss"),
               "best_val_loss": summarize(results, "best_val_loss")}
    tmp = config.run_dir / "cv.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(config.run_dir / "cv.json")
    for line in describe(summary):
        print(line)
    return 0
