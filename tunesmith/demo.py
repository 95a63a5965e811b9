"""`tunesmith demo` (`make demo`): the whole pipeline on a task with exactly checkable answers.

The task: rewrite a date given in everyday English ("the 5th of March, 2021", "Mar 5 2021",
"2021, March 5") as ISO 8601 ("2021-03-05"), answering with the date alone. The base
SmolLM2-135M-Instruct answers in sentences, in other formats, or with the wrong digits; a LoRA
fine-tune on a few thousand generated examples learns the format and the month mapping.

Steps: generate data → prepare → evaluate the base model → LoRA fine-tune → evaluate the tuned
model → print the before/after table and write out/demo/summary.json.
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import time
from pathlib import Path

from tunesmith import config as config_module
from tunesmith.evaluate import compare
from tunesmith.finetune import finetune
from tunesmith.log import say

MONTHS = list(calendar.month_name)[1:]
PHRASINGS = [
    "What is {date} in ISO 8601 format?",
    "Convert {date} to the YYYY-MM-DD format.",
    "Write the date {date} as an ISO date.",
    "Normalize this date to ISO 8601: {date}",
    "Give the ISO form of {date}.",
]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spoken_date(year: int, month: int, day: int, rng: random.Random) -> str:
    name = MONTHS[month - 1]
    short = name[:3]
    styles = [f"{name} {day}, {year}", f"{day} {name} {year}", f"{short} {day} {year}",
              f"the {_ordinal(day)} of {name}, {year}", f"{year}, {name} {day}", f"{short}. {_ordinal(day)}, {year}"]
    return rng.choice(styles)


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        year, month = rng.randint(1900, 2099), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        if (year, month, day) in seen:
            continue
        seen.add((year, month, day))
        question = rng.choice(PHRASINGS).format(date=spoken_date(year, month, day, rng))
        rows.append({"question": question, "answer": f"{year:04d}-{month:02d}-{day:02d}"})
    return rows


def demo_config(out_dir: Path, rows: int, steps: int) -> config_module.RunConfig:
    raw = {
        "model": "smollm2-135m",
        "method": "lora",
        "name": "demo",
        "out_dir": str(out_dir),
        "data": {"path": str(out_dir / "dates.jsonl"), "max_seq_length": 128,
                 "val_split": 0.04, "test_split": 0.1, "seed": 7},
        "train": {"learning_rate": 2e-3, "batch_size": 8, "micro_batch_size": 8, "max_steps": steps,
                  "warmup_steps": 10, "lr_schedule": "cosine", "eval_interval": 50, "eval_iters": 8,
                  "log_interval": 5},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "eval": {"max_samples": min(240, rows // 10), "max_new_tokens": 20},
    }
    return config_module.build(raw)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("dates", "preference"), default="dates",
                        help="dates: supervised LoRA; preference: DPO on chosen/rejected pairs")
    parser.add_argument("--out", default=None, help="run directory (default out/demo, out/demo-preference)")
    parser.add_argument("--rows", type=int, default=None, help="generated examples (default 3000; pairs 600)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of 8 examples (default 60; "
                                                                 "preference 40)")
    args = parser.parse_args(argv)
    if args.task == "preference":
        from tunesmith.demo_preference import run

        return run(args.out or "out/demo-preference", args.rows or 600, args.steps or 40)
    args.out, args.rows, args.steps = args.out or "out/demo", args.rows or 3000, args.steps or 60
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.rows, seed=1234)
    (out_dir / "dates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = demo_config(out_dir, args.rows, args.steps)
    say(f"Demo task: rewrite dates as ISO 8601, e.g. {rows[0]['question']!r} -> {rows[0]['answer']!r}")

    started = time.perf_counter()
    base_results, base_answers = compare.evaluate(config, tuned=False)
    base_seconds = time.perf_counter() - started
    result = finetune(config)
    known = {"base": (base_results["base"], base_answers["base"])}
    tuned_started = time.perf_counter()
    results, _ = compare.evaluate(config, tuned=True, known=known)
    tuned_seconds = time.perf_counter() - tuned_started
    base = results["base"]
    compare.print_table(results)
    from tunesmith.report import write_report

    say(f"Report: {write_report(config)}")  # curves, diagnosis, the table above, errors, samples
    summary = {"base_exact_match": base["exact_match"], "tuned_exact_match": results["tuned"]["exact_match"],
               "base_token_f1": base["token_f1"], "tuned_token_f1": results["tuned"]["token_f1"],
               "base_test_loss": base["test_loss"], "tuned_test_loss": results["tuned"]["test_loss"],
               "n_test": base["n_test"], "train_steps": result.steps, "train_seconds": result.seconds,
               "train_tokens_per_second": result.tokens_per_second,
               "base_evaluation_seconds": base_seconds, "tuned_evaluation_seconds": tuned_seconds,
               "total_seconds": time.perf_counter() - started}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"Exact match: base {summary['base_exact_match']:.1%} -> tuned {summary['tuned_exact_match']:.1%} "
          f"on {summary['n_test']} held-out rows; trained {result.steps} steps in {result.seconds:.0f} s "
          f"({result.tokens_per_second:.0f} tokens/s). Summary: {out_dir / 'summary.json'}")
    return 0
