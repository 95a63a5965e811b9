"""Model quality, side by side: does a fine-tune with tunesmith's defaults make the model better at a
real task than one with TRL's SFTTrainer + PEFT at their defaults, for the same compute?

    .venv/bin/python bench/quality.py [--tasks sentiment,syllables,docstring] [--runs base,trl,...]

Tasks (bench/quality_tasks.py): real public data that ships in a package, never written or
generated here, each with 200 held-out test rows scored by the task's metric. The model is the
embedded SmolLM2-135M-Instruct (no hub access). Runs, each in a process of its own:

- base: the model as shipped.
- trl: TRL's SFTTrainer with SFTConfig's defaults and PEFT's LoraConfig(task_type="CAUSAL_LM")
  defaults, on a prompt-completion dataset (TRL then trains on the completions only). Two switches
  that change speed, not the result, are set so TRL runs at its faster setting on a CPU:
  bf16=False and gradient_checkpointing=False.
- trl_lr2e-4: the same with learning_rate=2e-4, the rate PEFT's and TRL's LoRA examples use (a
  stronger peer than the defaults; reported, not the target).
- tunesmith: `tunesmith finetune` with only the data, the test file and the step count given.
- tunesmith_auto: the same with train.learning_rate auto (the range test picks the rate).

Every trained run takes the same optimizer steps at batch 8 (both tools' default batch). Scoring
is one procedure for every model: the prompt in the model's chat template (what both tools train
with here), greedy decoding, the answer's text scored against the reference. A tunesmith run is
scored at the checkpoint its own merge and export pick (best/ by validation loss, else final/);
a TRL run at its final adapter. Wall time is the training process's, loading and saving included.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from processes import cpu_model, last_error, run_measured  # bench/ is on the path of a script run from it
from quality_tasks import DEFAULT_TASKS, TASKS, Task

from tunesmith.model.load import resolve

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
BATCH = 8
RUNS = ("base", "trl", "trl_lr2e-4", "tunesmith", "tunesmith_auto")
CHILD_TIMEOUT_SECONDS = 3600


# ---------------------------------------------------------------------------------------------
# Children: train with TRL, score a model.

def train_trl(spec: dict) -> None:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                           "completion": [{"role": "assistant", "content": r["completion"]}]}
                                          for r in rows])
    location = str(resolve(MODEL))
    extra = {"learning_rate": spec["learning_rate"]} if spec.get("learning_rate") else {}
    args = SFTConfig(output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=BATCH,
                     bf16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
                     report_to="none", save_strategy="no", logging_steps=10, **extra)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(location),
                         peft_config=LoraConfig(task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(spec["adapter"])


def load_scored_model(adapter: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = str(resolve(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(location, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), tokenizer


def score(answer: str, reference: str, metric: str, labels: list[str]) -> float:
    from tunesmith.evaluate.metrics import exact_match, rouge

    if metric == "rougeL":
        return rouge(answer, reference)["rougeL"]
    if metric == "accuracy":  # the class is the label word the answer names first
        found = sorted((at, label) for label in labels if (at := answer.lower().find(label)) >= 0)
        return float(bool(found) and found[0][1] == reference)
    return exact_match(answer, reference, normalized=True)


@torch.inference_mode()
def score_model(spec: dict) -> None:
    model, tokenizer = load_scored_model(spec.get("adapter"))
    rows = [json.loads(line) for line in Path(spec["test"]).read_text().splitlines()]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) for r in rows]
    answers = []
    for start in range(0, len(prompts), 16):
        batch = tokenizer(prompts[start:start + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=False, max_new_tokens=spec["max_new_tokens"],
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    scores = [score(a, r["completion"], spec["metric"], spec["labels"]) for a, r in zip(answers, rows)]
    Path(spec["predictions"]).write_text("".join(
        json.dumps({"prompt": row["prompt"], "reference": row["completion"], "answer": answer, "score": value}) + "\n"
        for row, answer, value in zip(rows, answers, scores)))
    Path(spec["result"]).write_text(json.dumps({"score": statistics.mean(scores), "rows": len(scores)}))


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    torch.manual_seed(0)
    {"trl": train_trl, "score": score_model}[spec["kind"]](spec)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: data, runs, table.

def write_task(task: Task, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        paths[split] = folder / f"{split}.jsonl"
        rows = getattr(task, split)
        paths[split].write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                        for r in rows))
    return paths


def run_child(spec: dict, folder: Path, name: str) -> tuple[int, float, str]:
    """Run this script as a child on spec; returns (exit code, wall seconds, error line)."""
    spec_path = folder / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    child = run_measured(command, folder / f"{name}.log", HERE.parent, CHILD_TIMEOUT_SECONDS)
    return child.returncode, child.wall_seconds, last_error(folder / f"{name}.log", child.returncode)


def train(run: str, task: Task, paths: dict, folder: Path) -> tuple[str | None, float, str]:
    """Train one run; returns (its adapter folder, wall seconds, error or "")."""
    if run.startswith("trl"):
        adapter = folder / "adapter"
        spec = {"kind": "trl", "train": str(paths["train"]), "steps": task.steps, "run_dir": str(folder / "trainer"),
                "adapter": str(adapter), "learning_rate": 2e-4 if run == "trl_lr2e-4" else None}
        code, wall, error = run_child(spec, folder, "train")
        return (str(adapter) if code == 0 else None), wall, (error if code else "")
    command = [sys.executable, "-m", "tunesmith", "finetune", "--model", MODEL, "--data.path", str(paths["train"]),
               "--data.test_path", str(paths["test"]), "--out_dir", str(folder / "run"),
               "--train.max_steps", str(task.steps), "--train.batch_size", str(BATCH)]
    if run == "tunesmith_auto":
        command += ["--train.learning_rate", "auto"]
    child = run_measured(command, folder / "train.log", HERE.parent, CHILD_TIMEOUT_SECONDS)
    if child.returncode != 0:
        return None, child.wall_seconds, last_error(folder / "train.log", child.returncode)
    from tunesmith.train import checkpoint

    return str(checkpoint.pick(folder / "run")), child.wall_seconds, ""


def measure(run: str, task: Task, paths: dict, work: Path) -> dict:
    folder = work / task.name / run
    folder.mkdir(parents=True, exist_ok=True)
    adapter, wall, error = (None, 0.0, "") if run == "base" else train(run, task, paths, folder)
    row = {"task": task.name, "run": run, "train_seconds": wall, "error": error, "score": None,
           "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if error:
        return row
    spec = {"kind": "score", "adapter": adapter, "test": str(paths["test"]), "metric": task.metric,
            "max_new_tokens": task.max_new_tokens, "labels": list(task.labels), "predictions": str(folder / "predictions.jsonl"),
            "result": str(folder / "score.json")}
    code, _, error = run_child(spec, folder, "score")
    if code:
        return {**row, "error": error}
    row["score"] = json.loads((folder / "score.json").read_text())["score"]
    if run == "tunesmith_auto":
        row["learning_rate"] = _picked_rate(folder / "run")
    return row


def _picked_rate(run_dir: Path) -> float | None:
    found = run_dir / "lr_find.json"
    return json.loads(found.read_text()).get("pick") if found.is_file() else None


def margin(rows: dict[str, dict], run: str, peer: str = "trl") -> float | None:
    """How far `run` is ahead of the peer (TRL's defaults), as a share of the peer's gain over the base."""
    base, trl, ours = (rows.get(name, {}).get("score") for name in ("base", peer, run))
    if None in (base, trl, ours) or trl == base:
        return None
    return (ours - trl) / abs(trl - base)


def _cell(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _when(rows: dict[str, dict]) -> str:
    """When a task's rows were measured: one date, or each run's where `--runs` re-measured some."""
    dates = {run: row.get("measured") for run, row in rows.items()}
    known = {date for date in dates.values() if date}
    if not known:
        return "before dates were kept"
    if len(known) == len(set(dates.values())):  # every row dated
        return min(known) if len(known) == 1 else f"{min(known)} to {max(known)}"
    return "; ".join(f"{run} {date or 'before dates were kept'}" for run, date in dates.items())


def task_lines(task: Task, rows: dict[str, dict]) -> list[str]:
    title = (f"**{task.name}** ({task.metric}, {len(task.test)} test rows, {task.steps} steps × batch {BATCH}; "
             f"data: {task.source}, {len(task.train)} training rows; measured {_when(rows)})")
    lines = [title, "",
             f"| run | {task.metric} | vs base | vs TRL defaults (share of TRL's gain) | training wall s | note |",
             "|---|---:|---:|---:|---:|---|"]
    base = rows.get("base", {}).get("score")
    for run, row in rows.items():
        gain = None if row["score"] is None or base is None else row["score"] - base
        share = margin(rows, run) if run.startswith("tunesmith") or run == "trl_lr2e-4" else None
        note = row["error"] or (f"picked learning rate {row['learning_rate']:.2e}" if row.get("learning_rate") else "")
        wall = "" if run == "base" else f"{row['train_seconds']:.0f}"
        lines.append(f"| {run} | {_cell(row['score'])} | {'' if gain is None else f'{gain:+.3f}'} | "
                     f"{'' if share is None else f'{share:+.0%}'} | {wall} | {note} |")
    majority = majority_score(task)
    if majority is not None:
        lines.append(f"| (no model: always {majority[0]!r}, the most common training answer) | {majority[1]:.3f} | "
                     f"{'' if base is None else f'{majority[1] - base:+.3f}'} |  |  |  |")
    return lines + [""]


def majority_score(task: Task) -> tuple[str, float] | None:
    """For a classification task: the most common training answer, and its accuracy on the test rows."""
    if task.metric != "accuracy":
        return None
    common = collections.Counter(row["completion"] for row in task.train).most_common(1)[0][0]
    return common, sum(row["completion"] == common for row in task.test) / len(task.test)


def verdict_lines(results: dict[str, dict[str, dict]]) -> list[str]:
    lines = []
    for run in ("tunesmith", "tunesmith_auto"):
        for peer, called in (("trl", "TRL's defaults"), ("trl_lr2e-4", "TRL at learning_rate 2e-4")):
            pairs = [(rows.get(run, {}).get("score"), rows.get(peer, {}).get("score")) for rows in results.values()]
            if not pairs or any(None in pair for pair in pairs):
                continue
            ahead = sum(ours > theirs for ours, theirs in pairs)
            shares = [share for rows in results.values() if (share := margin(rows, run, peer)) is not None]
            left_out = len(pairs) - len(shares)
            mean = statistics.mean(shares) if shares else None
            words = "no task where it gained over the base" if mean is None else f"mean margin {mean:+.0%}"
            if left_out and shares:
                words += f" ({left_out} task{'s' if left_out > 1 else ''} where it gained nothing over the base left out)"
            met = ahead == len(pairs) and (mean is None or mean >= 0.2)
            target = f" (target: ahead on every task, mean ≥ +20%): {'met' if met else 'not met'}" if peer == "trl" else ""
            lines.append(f"- {run} against {called}: ahead on {ahead} of {len(pairs)} tasks; {words} of that "
                         f"run's gain over the base{target}")
    return lines


def report(args, tasks: list[Task], results: dict[str, dict[str, dict]]) -> list[str]:
    import transformers
    import trl

    measured = (f"On {cpu_model()} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
                f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}. "
                "Command: `make bench-quality` (that is, `.venv/bin/python bench/quality.py` after installing the "
                "bench extras); `--tasks NAME` measures one task again and keeps the others' rows.")
    lines = [measured, ""]
    for task in tasks:
        lines += task_lines(task, results[task.name])
    return lines + verdict_lines(results) + [""]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--work", type=Path, default=HERE / "_work" / "quality")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--report", action="store_true", help="only rewrite the RESULTS.md section from the kept results")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    unknown = [name for name in args.tasks.split(",") if name not in TASKS] + \
              [name for name in args.runs.split(",") if name not in RUNS]
    if unknown:
        print(f"unknown task or run: {', '.join(unknown)} (tasks: {', '.join(TASKS)}; runs: {', '.join(RUNS)})")
        return 2
    kept = args.work / "results.json"  # the tasks not measured this time keep their rows
    results: dict[str, dict[str, dict]] = json.loads(kept.read_text()) if kept.is_file() else {}
    built: dict[str, Task] = {}  # a task's data is read once (docstrings parses the whole standard library)
    for name in [] if args.report else args.tasks.split(","):
        task = built[name] = TASKS[name]()
        paths = write_task(task, args.work / task.name)
        kept_rows = results.get(task.name, {})  # runs not measured this time keep their rows, in their order
        results[task.name] = {run: kept_rows[run] for run in RUNS if run in kept_rows}
        for run in args.runs.split(","):
            row = measure(run, task, paths, args.work)
            results[task.name][run] = row
            print(json.dumps(row), flush=True)
        kept.write_text(json.dumps(results, indent=2))
    results = {name: results[name] for name in DEFAULT_TASKS if name in results}  # the table's tasks
    tasks = [built.get(name) or TASKS[name]() for name in results]
    from results_md import write_section

    title = "## Model quality: tunesmith vs TRL SFTTrainer + PEFT at their defaults, same steps (bench/quality.py)"
    section = [title, "", *report(args, tasks, results)]
    write_section(args.results, "quality", section)
    print("\n".join(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
