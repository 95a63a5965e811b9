"""`tunesmith demo --task preference`: DPO teaches the embedded model a style it was not shown
as demonstrations, only as preferences.

The task: the same date questions as the main demo ("What is the 5th of March, 2021 in ISO 8601
format?"). Each pair prefers the bare date ("2021-03-05") over the chatty answers a small
instruct model tends to give ("Sure! The 5th of March, 2021 in ISO 8601 format is 2021-03-05.
...") or a wrong one. DPO with LoRA on a few hundred pairs; then the held-out preference
accuracy and the answers of the base and the tuned model are shown side by side.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tunesmith import config as config_module
from tunesmith.demo import make_rows
from tunesmith.evaluate import compare
from tunesmith.finetune import finetune
from tunesmith.log import say

CHATTY = [
    "Sure! {question_date} in ISO 8601 format is {iso}. ISO 8601 writes the year first, then the month "
    "and the day.",
    "The date you asked about, {question_date}, can be written as {iso} in the ISO 8601 standard. "
    "Let me know if you need any other format!",
    "Of course. In ISO 8601 (YYYY-MM-DD), {question_date} becomes {iso}. This format is used "
    "internationally to avoid confusion.",
    "Great question! Converting {question_date} gives {iso}.",
]
WRONG = ["{day:02d}/{month:02d}/{year}", "{year}-{day:02d}-{month:02d}", "{month}/{day}/{year}"]


def make_pairs(count: int, seed: int) -> list[dict]:
    """Date questions with the bare ISO date as chosen, a chatty or wrongly formatted answer as rejected."""
    rng = random.Random(seed)
    pairs = []
    for row in make_rows(count, seed):
        year, month, day = (int(part) for part in row["answer"].split("-"))
        if rng.random() < 0.75:
            rejected = rng.choice(CHATTY).format(question_date=_date_in(row["question"]), iso=row["answer"])
        else:
            rejected = rng.choice(WRONG).format(year=year, month=month, day=day)
        pairs.append({"prompt": row["question"], "chosen": row["answer"], "rejected": rejected})
    return pairs


def _date_in(question: str) -> str:
    """The spoken date inside a generated question (after 'is', 'convert', ... up to the end)."""
    for marker in ("What is ", "Convert ", "Write the date ", "ISO 8601: ", "Give the ISO form of "):
        if marker in question:
            text = question.split(marker, 1)[1]
            for tail in (" in ISO 8601 format?", " to the YYYY-MM-DD format.", " as an ISO date.", "."):
                text = text.removesuffix(tail)
            return text
    return "that date"


def preference_config(out_dir: Path, rows: int, steps: int) -> config_module.RunConfig:
    raw = {
        "model": "smollm2-135m",
        "method": "dpo",
        "name": "demo-preference",
        "out_dir": str(out_dir),
        "data": {"path": str(out_dir / "date_pairs.jsonl"), "max_seq_length": 128,
                 "val_split": 0.05, "test_split": 0.15, "seed": 7},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "micro_batch_size": 8, "max_steps": steps,
                  "warmup_steps": 5, "lr_schedule": "cosine", "eval_interval": 20, "eval_iters": 4,
                  "log_interval": 2},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "preference": {"beta": 0.1},
        "eval": {"max_samples": 60, "max_new_tokens": 40, "batch_size": 30},
    }
    return config_module.build(raw)


def run(out: str, rows: int, steps: int) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(rows, seed=4321)
    (out_dir / "date_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = preference_config(out_dir, rows, steps)
    say(f"Demo task (preference): prefer {pairs[0]['chosen']!r} over {pairs[0]['rejected']!r}")
    started = time.perf_counter()
    base_results, base_answers = compare.evaluate(config, tuned=False)
    result = finetune(config)
    known = {"base": (base_results["base"], base_answers["base"])}
    results, answers = compare.evaluate(config, tuned=True, known=known)
    compare.print_table(results)
    from tunesmith.report import write_report

    say(f"Report: {write_report(config)}")
    _show_answers(answers)
    base, tuned = results["base"], results["tuned"]
    summary = {"base_preference_accuracy": base["preference_accuracy"],
               "tuned_preference_accuracy": tuned["preference_accuracy"],
               "base_exact_match": base["exact_match"], "tuned_exact_match": tuned["exact_match"],
               "base_answer_words": _mean_words(answers["base"]), "tuned_answer_words": _mean_words(answers["tuned"]),
               "train_steps": result.steps, "train_seconds": result.seconds,
               "total_seconds": time.perf_counter() - started}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"Held-out preference accuracy: base {base['preference_accuracy']:.1%} -> tuned "
          f"{tuned['preference_accuracy']:.1%}; answers {summary['base_answer_words']:.1f} -> "
          f"{summary['tuned_answer_words']:.1f} words; exact match {base['exact_match']:.1%} -> "
          f"{tuned['exact_match']:.1%}. Summary: {out_dir / 'summary.json'}")
    return 0


def _show_answers(answers: dict, count: int = 3) -> None:
    for index in range(min(count, len(answers["base"]))):
        print(f"  base:  {answers['base'][index][:100]!r}\n  tuned: {answers['tuned'][index][:100]!r}")


def _mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)
