"""`tunesmith evaluate CONFIG|RUN`: the base model and the fine-tuned run, side by side, on the
same held-out test rows: test loss and perplexity, then generated answers scored by exact
match and token F1. Writes eval/results.{csv,md,json} and eval/predictions.jsonl."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from tunesmith.config import RunConfig
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.data.prepare import prepare
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.metrics import exact_match, token_f1
from tunesmith.infer.generate import Loaded, generate, load_base, load_run
from tunesmith.log import say
from tunesmith.model.load import load_tokenizer, resolve
from tunesmith.train.attention import packed_attention
from tunesmith.train.batching import pack
from tunesmith.train.loss import loss_sum

METRICS = ("test_loss", "perplexity", "exact_match", "token_f1")


@torch.no_grad()
def test_loss(loaded: Loaded, split: TokenizedSplit, limit: int, micro_batch_size: int = 8) -> float:
    total, targets = 0.0, 0
    count = min(len(split), limit)
    for start in range(0, count, micro_batch_size):
        batch = pack(split, list(range(start, min(start + micro_batch_size, count)))).to(loaded.device)
        with packed_attention(loaded.model):
            total += float(loss_sum(loaded.model, batch))
        targets += batch.n_targets
    return total / max(targets, 1)


def default_max_new_tokens(rows: list[dict], tokenizer) -> int:
    longest = max(len(tokenizer(r["reference"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(512, int(longest * 1.5) + 8)


def score(loaded: Loaded, split: TokenizedSplit, rows: list[dict], config: RunConfig,
          max_new_tokens: int) -> tuple[dict, list[str]]:
    loss = test_loss(loaded, split, len(rows), config.train.micro_batch_size)
    with tqdm(total=len(rows), desc=f"generating ({loaded.label})", unit="row",
              dynamic_ncols=True) as bar:
        answers = generate(loaded, [r["prompt"] for r in rows], max_new_tokens, config.eval.batch_size,
                           progress=bar.update)
    normalized = config.eval.normalize
    em = [exact_match(a, r["reference"], normalized) for a, r in zip(answers, rows)]
    f1 = [token_f1(a, r["reference"]) for a, r in zip(answers, rows)]
    metrics = {"test_loss": loss, "perplexity": math.exp(min(loss, 50)),
               "exact_match": sum(em) / len(em), "token_f1": sum(f1) / len(f1), "n_test": len(rows)}
    return metrics, answers


def evaluate(config: RunConfig, tuned: bool = True, known: dict | None = None) -> tuple[dict, dict]:
    """Metrics and answers per model label ("base", "tuned"); labels in `known` are not recomputed."""
    run_dir = config.run_dir
    tokenizer = load_tokenizer(resolve(config.model), quiet=True)
    prepared = prepare(config, tokenizer)
    rows = prepared.rows("test")[: config.eval.max_samples]
    if not rows:
        raise TunesmithError("the test split is empty: set data.test_split above 0 or give data.test_path")
    split = prepared.splits["test"]
    max_new = config.eval.max_new_tokens or default_max_new_tokens(rows, tokenizer)
    loaders = {}
    if config.eval.compare_base or not tuned:
        loaders["base"] = lambda: load_base(config.model, config.data.template, config.data.system_prompt,
                                            config.train.device, config.train.precision)
    if tuned:
        loaders["tuned"] = lambda: load_run(run_dir, config.train.device, config.train.precision)
    results, answers = {}, {}
    for label, loader in loaders.items():
        if known and label in known:
            results[label], answers[label] = known[label]
            continue
        say(f"Evaluating the {label} model on {len(rows)} test rows")
        results[label], answers[label] = score(loader(), split, rows, config, max_new)
    write(run_dir / "eval", results, answers, rows, config.eval.normalize)
    return results, answers


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / name / "trainer_state.json").is_file() for name in ("best", "final"))


def table_rows(results: dict) -> list[list[str]]:
    labels = list(results)
    rows = []
    for metric in METRICS:
        values = [results[label][metric] for label in labels]
        row = [metric] + [f"{v:.4f}" for v in values]
        if len(values) == 2:
            row.append(f"{values[1] - values[0]:+.4f}")
        rows.append(row)
    return rows


def write(folder: Path, results: dict, answers: dict, rows: list[dict], normalized: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = list(results)
    header = ["metric", *labels] + (["change"] if len(labels) == 2 else [])
    body = table_rows(results)
    with (folder / "results.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *body])
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in body]
    markdown.append(f"\n{rows and len(rows)} held-out test rows; answers generated greedily.")
    (folder / "results.md").write_text("\n".join(markdown) + "\n")
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    with (folder / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for index, row in enumerate(rows):
            record = {"where": row["where"], "prompt": row["messages"], "reference": row["reference"]}
            for label in labels:
                answer = answers[label][index]
                record[label] = answer
                record[f"{label}_exact_match"] = exact_match(answer, row["reference"], normalized)
                record[f"{label}_token_f1"] = token_f1(answer, row["reference"])
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = list(results)
    table = Table(title=f"Evaluation on {next(iter(results.values()))['n_test']} held-out rows")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    if len(labels) == 2:
        table.add_column("change", justify="right")
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)


def main(config: RunConfig) -> int:
    tuned = has_checkpoint(config.run_dir)
    if not tuned:
        say(f"No fine-tuned checkpoint in {config.run_dir}: evaluating the base model only")
    results, _ = evaluate(config, tuned=tuned)
    print_table(results)
    print(f"Written: {config.run_dir / 'eval'}/results.csv, results.md, predictions.jsonl")
    return 0
