"""`tunesmith evaluate CONFIG|RUN`: the base model and the fine-tuned run, side by side, on the
same held-out test rows: test loss and perplexity, then generated answers scored by exact match,
token F1, BLEU and ROUGE-1/2/L, and an error analysis (failures grouped, regressions listed).
With --tasks, standard benchmarks through lm-evaluation-harness; with --bias, a counterfactual
bias probe; each model is loaded once for all of them.

Writes eval/results.{csv,md,json}, eval/predictions.jsonl (per row), eval/errors.{json,md},
eval/benchmarks.{json,md} and eval/bias.{json,md} when asked, and refreshes report.html."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tunesmith.config import PAIRED_METHODS, RunConfig
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.data.prepare import prepare
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import analysis
from tunesmith.evaluate.metrics import (
    bleu,
    exact_match,
    normalize,
    rouge,
    sentence_bleu,
    table_rows,
    token_f1,
)
from tunesmith.infer.engine import Sampling
from tunesmith.infer.generate import Loaded, load_base, load_run, run_requests
from tunesmith.log import say
from tunesmith.model.load import load_tokenizer, resolve
from tunesmith.train.batching import pack
from tunesmith.train.kernels import packed_attention, shares_prefixes
from tunesmith.train.loss import loss_sum


@torch.no_grad()
def loss_totals(loaded: Loaded, split: TokenizedSplit, indices: list[int], micro_batch_size: int = 8
                ) -> tuple[float, int]:
    """Summed loss and target count of the examples at `indices`, packed `micro_batch_size` at a time."""
    total, targets = 0.0, 0
    for start in range(0, len(indices), micro_batch_size):
        batch = pack(split, indices[start:start + micro_batch_size], shares_prefixes(loaded.model)).to(loaded.device)
        with packed_attention(loaded.model):
            total += float(loss_sum(loaded.model, batch))
        targets += batch.n_targets
    return total, targets


def continuations(split: TokenizedSplit, prompt_ids: list[list[int]]) -> list[tuple[list[int], list[bool]] | None]:
    """For each test row whose tokenized example begins with exactly the prompt generation reads: the
    rest of the example (the reference answer, end of turn) and which of its tokens are targets. The
    generation's prefill then reads them too, and the test loss needs no pass of its own. None where
    the example starts otherwise (a multi-turn row with targets in earlier turns, a cut prompt)."""
    found: list[tuple[list[int], list[bool]] | None] = []
    for index, prompt in enumerate(prompt_ids[:len(split)]):
        ids, supervised = split.example(index)
        first_target = int(supervised.long().argmax()) if bool(supervised.any()) else len(ids)
        if first_target != len(prompt) or first_target == 0 or ids[:first_target].tolist() != prompt:
            found.append(None)
            continue
        found.append((ids[first_target:].tolist(), supervised[first_target:].tolist()))
    return found + [None] * (len(prompt_ids) - len(found))


GENERATION_MEMORY_SHARE = 0.25  # of the free memory, for eval.batch_size auto


def generation_batch(loaded: Loaded, config: RunConfig, split: TokenizedSplit, n_rows: int, max_new: int) -> int:
    """eval.batch_size, or with auto the rows whose KV cache fits in a share of the free memory: more
    rows per decode step keep the matrix units busier (the demo's 240 rows: 31 s at 48, 21 s at 240)."""
    if config.eval.batch_size != "auto":
        return config.eval.batch_size
    from tunesmith.estimate import available_memory

    model = loaded.model.config
    heads = getattr(model, "num_attention_heads", 1)
    head_dim = getattr(model, "head_dim", None) or model.hidden_size // heads
    kv_heads = getattr(model, "num_key_value_heads", None) or heads
    element = next(loaded.model.parameters()).element_size()
    per_token = 2 * model.num_hidden_layers * kv_heads * head_dim * element  # keys and values, every layer
    longest = int(split.lengths[:n_rows].max()) + max_new if len(split) else max_new
    budget = available_memory(str(loaded.device))[0] * GENERATION_MEMORY_SHARE
    return max(1, min(n_rows, int(budget // (per_token * longest))))


def default_max_new_tokens(rows: list[dict], tokenizer) -> int:
    longest = max(len(tokenizer(r["reference"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(512, int(longest * 1.5) + 8)


def row_scores(answer: str, reference: str, normalized) -> dict:
    """Every generation metric of one answer; BLEU and ROUGE see the normalised texts when
    eval.normalize is on (token F1 always compares normalised words)."""
    shown = (lambda text: normalize(text, normalized)) if normalized else (lambda text: text)
    return {"exact_match": exact_match(answer, reference, normalized), "token_f1": token_f1(answer, reference),
            "bleu": sentence_bleu(shown(answer), shown(reference)), **rouge(shown(answer), shown(reference))}


def generation_scores(answers: list[str], rows: list[dict], normalized) -> dict:
    """Means over rows; BLEU is corpus BLEU (n-gram counts summed over rows), as sacrebleu reports it."""
    references = [r["reference"] for r in rows]
    per_row = [row_scores(a, ref, normalized) for a, ref in zip(answers, references)]
    means = {key: sum(s[key] for s in per_row) / len(per_row) for key in ("exact_match", "token_f1", "rouge1",
                                                                           "rouge2", "rougeL")}
    shown = (lambda text: normalize(text, normalized)) if normalized else (lambda text: text)
    means["bleu"] = bleu([shown(a) for a in answers], [shown(ref) for ref in references])
    return means


def score(loaded: Loaded, split: TokenizedSplit, rows: list[dict], config: RunConfig,
          max_new_tokens: int) -> tuple[dict, list[str]]:
    preference = {}
    if split.labels is not None:  # a preference run: rank chosen vs rejected; the loss is on chosen answers
        from tunesmith.evaluate.preference import preference_scores

        preference = preference_scores(loaded.model, split, config.objective in PAIRED_METHODS, loaded.device,
                                       config.train.micro_batch_size)
    prompt_ids = [loaded.encoder.encode_prompt(r["prompt"]) for r in rows]
    scored = continuations(split, prompt_ids) if not preference else [None] * len(rows)
    with tqdm(total=len(rows), desc=f"generating ({loaded.label})", unit="row",
              dynamic_ncols=True) as bar:
        requests = run_requests(loaded, prompt_ids, Sampling(max_new_tokens=max_new_tokens),
                                generation_batch(loaded, config, split, len(rows), max_new_tokens), bar.update, scored)
    answers = [r.text.strip() for r in requests]
    hit_limit = [r.finish_reason == "length" for r in requests]
    if preference:
        loss = preference["test_loss"]
    else:  # what the prefills read, and the rows they could not read in one pass
        apart = [i for i, s in enumerate(scored) if s is None and i < len(split)]
        total, targets = loss_totals(loaded, split, apart, config.train.micro_batch_size)
        total -= sum(r.score_logprob for r in requests)
        loss = total / max(targets + sum(r.score_count for r in requests), 1)
    metrics = {**preference, "test_loss": loss, "perplexity": math.exp(min(loss, 50)),
               **generation_scores(answers, rows, config.eval.normalize), "n_test": len(rows),
               "truncated_rows": [i for i, hit in enumerate(hit_limit) if hit]}
    return metrics, answers


@dataclass
class Evaluation:
    """Everything one `evaluate` found, per model label ("base", "tuned")."""

    rows: list[dict] = field(default_factory=list)  # the held-out test rows scored
    results: dict = field(default_factory=dict)  # label → metrics
    answers: dict = field(default_factory=dict)  # label → generated answers, in row order
    errors: dict | None = None  # the error analysis
    benchmarks: dict = field(default_factory=dict)  # label → lm-eval scores per task
    bias: dict = field(default_factory=dict)  # label → bias probe measurements


def evaluate(config: RunConfig, tuned: bool = True, known: dict | None = None) -> tuple[dict, dict]:
    """Metrics and answers per model label ("base", "tuned"); labels in `known` are not recomputed."""
    outcome = run_evaluation(config, tuned, known, extras=False)
    return outcome.results, outcome.answers


def model_loaders(config: RunConfig, tuned: bool) -> dict:
    loaders = {}
    if config.eval.compare_base or not tuned:
        loaders["base"] = lambda: load_base(config.model, config.data.template, config.data.system_prompt,
                                            config.train.device, config.train.precision)
    if tuned:
        loaders["tuned"] = lambda: load_run(config.run_dir, config.train.device, config.train.precision)
    return loaders


def held_out_rows(config: RunConfig, extras_only: bool) -> tuple[list[dict], TokenizedSplit | None, int]:
    """The test rows, their tokens and the answer length cap; none when only benchmarks or the bias
    probe were asked for and there is no data."""
    if extras_only and not config.data.path:
        say("No data.path: skipping the held-out test rows (benchmarks / bias probe only)")
        return [], None, 0
    tokenizer = load_tokenizer(resolve(config.model), quiet=True)
    prepared = prepare(config, tokenizer)
    if prepared.manifest["format"]["train"] == "text":  # blocks of raw text: no question to answer
        raise TunesmithError("evaluate scores answers to held-out questions, and a data.format: text run "
                             "(continued pre-training) has none; its validation loss is in metrics.jsonl")
    rows = [row for row in prepared.rows("test") if row.get("label", True)]  # kto: answer desirable prompts
    rows = rows[: config.eval.max_samples]
    if not rows:
        raise TunesmithError("the test split is empty: set data.test_split above 0 or give data.test_path")
    return rows, prepared.splits["test"], config.eval.max_new_tokens or default_max_new_tokens(rows, tokenizer)


def run_evaluation(config: RunConfig, tuned: bool = True, known: dict | None = None,
                   extras: bool = True) -> Evaluation:
    """Each model is loaded once and put through everything asked for; then the files are written."""
    known = known or {}
    wants = {"tasks": extras and bool(config.eval.tasks), "bias": extras and config.eval.bias}
    if wants["tasks"]:  # a task name's typo is refused before the data is prepared
        from tunesmith.evaluate import benchmarks

        benchmarks.check_tasks(config)
    rows, split, max_new = held_out_rows(config, extras_only=any(wants.values()))
    outcome = Evaluation(rows=rows)
    for label, loader in model_loaders(config, tuned).items():
        if label in known:
            outcome.results[label], outcome.answers[label] = known[label]
        if not (rows and label not in known) and not any(wants.values()):
            continue
        loaded = loader()
        if rows and label not in known:
            say(f"Evaluating the {label} model on {len(rows)} test rows")
            outcome.results[label], outcome.answers[label] = score(loaded, split, rows, config, max_new)
        run_extras(loaded, label, config, wants, outcome)
        del loaded
    folder = config.run_dir / "eval"
    if rows:
        outcome.errors = write(folder, outcome.results, outcome.answers, rows, config.eval.normalize,
                               config.eval.group_by, config.eval.error_examples)
    if outcome.benchmarks:
        from tunesmith.evaluate import benchmarks

        benchmarks.write(folder, outcome.benchmarks)
    if outcome.bias:
        from tunesmith.evaluate import bias

        bias.write(folder, outcome.bias, config.eval.bias_threshold)
    return outcome


def run_extras(loaded: Loaded, label: str, config: RunConfig, wants: dict, outcome: Evaluation) -> None:
    if wants["tasks"]:
        from tunesmith.evaluate import benchmarks

        say(f"Benchmarks for the {label} model: {', '.join(config.eval.tasks)}")
        outcome.benchmarks[label] = benchmarks.run_tasks(loaded, config)
    if wants["bias"]:
        from tunesmith.evaluate import bias

        say(f"Bias probe for the {label} model")
        outcome.bias[label] = bias.probe(loaded, bias.load_probes(config.eval.bias_pairs), config.eval.fixed_batch)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / name / "trainer_state.json").is_file() for name in ("best", "final"))


def write(folder: Path, results: dict, answers: dict, rows: list[dict], normalized,
          group_by: str | None = None, error_examples: int = 3) -> dict:
    """The tables, the per-row results (predictions.jsonl) and the error analysis, which it returns."""
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
    truncated = {label: set(results[label].get("truncated_rows", ())) for label in labels}
    errors = analysis.analyse(rows, answers, truncated, normalized, group_by, error_examples)
    (folder / "errors.json").write_text(json.dumps(errors, indent=2, ensure_ascii=False))
    (folder / "errors.md").write_text(analysis.markdown(errors))
    with (folder / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for index, row in enumerate(rows):
            record = {"where": row["where"], "prompt": row["messages"], "reference": row["reference"]}
            for label in labels:
                answer = answers[label][index]
                record[label] = answer
                record.update({f"{label}_{key}": value for key, value in
                               row_scores(answer, row["reference"], normalized).items()})
                record[f"{label}_error"] = analysis.failure_kind(answer, row["reference"], index in truncated[label]) \
                    if record[f"{label}_exact_match"] < 1 else None
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return errors


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
    from tunesmith.device import pick_device, use_threads

    use_threads(config.train.threads, pick_device(config.train.device))
    tuned = has_checkpoint(config.run_dir)
    if not tuned:
        say(f"No fine-tuned checkpoint in {config.run_dir}: evaluating the base model only")
    outcome = run_evaluation(config, tuned=tuned)
    written = []
    if outcome.results:
        print_table(outcome.results)
        for line in analysis.summary_lines(outcome.errors):
            print(line)
        written += ["results.csv", "results.md", "predictions.jsonl", "errors.md"]
    if outcome.benchmarks:
        from tunesmith.evaluate import benchmarks

        benchmarks.print_table(outcome.benchmarks)
        written.append("benchmarks.md")
    if outcome.bias:
        from tunesmith.evaluate import bias

        bias.print_summary(outcome.bias, config.eval.bias_threshold)
        written.append("bias.md")
    print(f"Written: {config.run_dir / 'eval'}/{', '.join(written)}")
    if (config.run_dir / "metrics.jsonl").is_file():  # a trained run: its report now has the evaluation
        from tunesmith import report

        print(f"Report: {report.write_report(config)}")
    return 0
