"""`tunesmith inspect CONFIG`: the data doctor. It reads, cleans and splits the data exactly as
prepare does, measures every example in tokens, and says what is wrong before compute is spent.

    counts per source and split; what cleaning removed, with examples; empty fields; duplicates
    and leakage; prompt / response / total token lengths (PNG, the truncation point marked);
    the share of tokens trained on; a few rendered examples showing which tokens are trained on;
    a verdict with concrete advice.

Written to the terminal and to <run>/inspect.md (and <run>/plots/token_lengths.png).
Nothing else is written: the prepared data is prepare's business.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data import dedup
from tunesmith.data.doctor_pairs import pair_findings, pair_stats
from tunesmith.data.formats import PAIR_FORMATS, PREFERENCE_FORMATS
from tunesmith.data.gather import SPLITS, Gathered, gather
from tunesmith.data.templates import Encoder, Template, choose, pieces
from tunesmith.data.text import document_ids

PREVIEW_EXAMPLES = 3
NO_CONFLICTS = ("text", *PREFERENCE_FORMATS)  # documents; prompts with several pairs are normal
TRUNCATION_PROBLEM_SHARE = 0.05  # above this share of truncated training examples, it is a problem


@dataclass
class Measured:
    """Token counts of one split's examples, before truncation (one entry per example)."""

    where: list[str] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)  # tokens not trained on (with mask_prompt)
    response: list[int] = field(default_factory=list)  # tokens of the answers
    total: list[int] = field(default_factory=list)
    kept_response: list[int] = field(default_factory=list)  # answer tokens left after truncation
    filtered: dict[str, int] = field(default_factory=lambda: {"too_short": 0, "too_long": 0})


def measure(examples, fmt: str, template: Template, tokenizer, data) -> Measured:
    encoder, out = Encoder(tokenizer), Measured()
    for example in examples:
        if fmt == "text":
            ids = document_ids(encoder, tokenizer, example.reference)
            supervised = [True] * len(ids)
        else:
            ids, supervised = encoder.encode(pieces(template, example, tokenizer), mask_prompt=True)
        if len(ids) < data.clean.min_tokens:
            out.filtered["too_short"] += 1
            continue
        if data.clean.max_tokens is not None and len(ids) > data.clean.max_tokens:
            out.filtered["too_long"] += 1
            continue
        out.where.append(example.where)
        out.total.append(len(ids))
        out.response.append(sum(supervised))
        out.prompt.append(len(ids) - sum(supervised))
        out.kept_response.append(sum(supervised[: data.max_seq_length]))
    return out


def percentiles(values: list[int]) -> dict:
    if not values:
        return {"median": 0, "p95": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(values)

    def at(share: float) -> int:  # nearest-rank percentile
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]

    return {"median": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def split_stats(measured: Measured, fmt: str, data) -> dict:
    limit, n = data.max_seq_length, len(measured.total)
    if fmt == "text":  # documents are concatenated and cut into blocks: nothing is truncated
        tokens = sum(measured.total)
        return {"examples": n, "documents": n, "blocks": math.ceil(tokens / limit) if tokens else 0,
                "truncated": 0, "truncated_share": 0.0, "response_tokens_lost_share": 0.0,
                "dropped_no_response": 0, **measured.filtered, "tokens": tokens, "supervised_tokens": tokens,
                "supervised_share": 1.0 if tokens else 0.0, "prompt": percentiles([]),
                "response": percentiles(measured.response), "total": percentiles(measured.total)}
    truncated = [i for i in range(n) if measured.total[i] > limit]
    answers_lost = sum(measured.response[i] - measured.kept_response[i] for i in range(n))
    kept = [i for i in range(n) if measured.kept_response[i] > 0 or not data.mask_prompt]
    dropped = n - len(kept)  # the prompt fills the window: no answer token left to learn from
    tokens = sum(min(measured.total[i], limit) for i in kept)
    supervised = tokens if not data.mask_prompt else sum(measured.kept_response)
    return {"examples": n - dropped, "truncated": len(truncated),
            "truncated_share": len(truncated) / n if n else 0.0,
            "response_tokens_lost_share": answers_lost / max(sum(measured.response), 1),
            "dropped_no_response": dropped, **measured.filtered, "tokens": tokens,
            "supervised_tokens": supervised, "supervised_share": supervised / tokens if tokens else 0.0,
            "prompt": percentiles(measured.prompt), "response": percentiles(measured.response),
            "total": percentiles(measured.total)}


def conflicting_answers(examples) -> int:
    """Prompts that appear more than once with different answers (normalised text)."""
    answers: dict[str, set[str]] = {}
    for example in examples:
        prompt = "\x1f".join(dedup.normalized(m["content"]) for m in example.prompt_messages)
        answers.setdefault(prompt, set()).add(dedup.normalized(example.reference))
    return sum(1 for found in answers.values() if len(found) > 1)


def suggested_length(totals: list[int]) -> int:
    """A max_seq_length that holds 99% of the examples, rounded up to a multiple of 64."""
    p99 = percentiles(totals)["p99"]
    return max(64, math.ceil(p99 / 64) * 64)


def preview(examples, fmt: str, template: Template, tokenizer, data, count: int = PREVIEW_EXAMPLES
            ) -> list[list[tuple[str, bool]]]:
    """The first rendered examples as (text, trained-on) runs, as the model will see them."""
    encoder, out = Encoder(tokenizer), []
    for example in examples[:count]:
        if fmt == "text":
            ids = document_ids(encoder, tokenizer, example.reference)[: data.max_seq_length]
            supervised = [True] * len(ids)
        else:
            ids, supervised = encoder.encode(pieces(template, example, tokenizer), data.mask_prompt)
            ids, supervised = ids[: data.max_seq_length], supervised[: data.max_seq_length]
        runs, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or supervised[i] != supervised[start]:
                runs.append((tokenizer.decode(ids[start:i]), bool(supervised[start])))
                start = i
        out.append(runs)
    return out


def diagnose(config: RunConfig, tokenizer) -> dict:
    """Every number of the report, and the findings; no output."""
    data = config.data
    gathered = gather(config)
    fmt = gathered.format
    template = choose(data.template, tokenizer, data.system_prompt)
    template = dataclasses.replace(template, last_turn_only=data.assistant_turns == "last")
    measured = {name: measure(gathered.examples[name], fmt, template, tokenizer, data) for name in SPLITS}
    splits = {name: {"rows": len(gathered.examples[name]), **split_stats(measured[name], fmt, data)}
              for name in SPLITS}
    report = {"format": fmt, "template": "none (text blocks)" if fmt == "text" else template.describe,
              "max_seq_length": data.max_seq_length, "mask_prompt": data.mask_prompt,
              "sources": gathered.sources, "cleaning": gathered.cleaning, "leakage": gathered.leakage,
              "folds": gathered.folds, "splits": splits,
              "conflicting_prompts": 0 if fmt in NO_CONFLICTS else conflicting_answers(gathered.examples["train"]),
              "suggested_max_seq_length": suggested_length(measured["train"].total),
              "lengths": {name: {"prompt": m.prompt, "response": m.response, "total": m.total}
                          for name, m in measured.items()},
              "preview": preview(gathered.examples["train"], fmt, template, tokenizer, data)}
    report["findings"] = findings(report, gathered, config)
    if fmt in PAIR_FORMATS:
        report["pairs"] = pair_stats(gathered.examples["train"], template, tokenizer, data.max_seq_length)
        identical = sum(c["counts"].get("identical_pairs", 0) for c in gathered.cleaning.values())
        report["findings"] += pair_findings(report["pairs"], identical, data.max_seq_length)
    return report


def findings(report: dict, gathered: Gathered, config: RunConfig) -> list[dict]:
    """(level, message) with level problem | warning | note; problems make the verdict 'fix first'."""
    out = []

    def add(level: str, message: str) -> None:
        out.append({"level": level, "message": message})

    data, train = config.data, report["splits"]["train"]
    limit = data.max_seq_length
    if train["truncated"]:
        share = train["truncated_share"]
        add("problem" if share > TRUNCATION_PROBLEM_SHARE else "warning",
            f"{_pct(share)} of training examples are longer than max_seq_length={limit} tokens and are "
            f"truncated ({_pct(train['response_tokens_lost_share'])} of answer tokens lost): raise "
            f"data.max_seq_length to {report['suggested_max_seq_length']} (holds 99% of the examples) "
            f"or drop them with data.clean.max_tokens: {limit}")
    if train["dropped_no_response"]:
        add("problem", f"{train['dropped_no_response']} training rows have prompts that fill all {limit} "
            "tokens, so nothing of their answer is trained on (they are dropped): raise data.max_seq_length")
    if train["examples"] < 20:
        add("problem", f"only {train['examples']} training examples: too few to learn a behaviour "
            "(the model will memorise them); aim for a few hundred")
    elif train["examples"] < 200:
        add("warning", f"{train['examples']} training examples is a small set: expect to overfit "
            "quickly; watch the validation loss and keep epochs low")
    if report["splits"]["val"]["rows"] == 0:
        add("warning", "no validation rows: overfitting will go unnoticed; set data.val_split (e.g. 0.1)")
    if report["splits"]["test"]["rows"] == 0:
        add("warning", "no test rows: `tunesmith evaluate` has nothing to score; set data.test_split")
    out += _leakage_findings(report["leakage"])
    out += _cleaning_findings(report["cleaning"], gathered)
    if report["conflicting_prompts"]:
        add("note", f"{report['conflicting_prompts']} training prompts appear with different answers; "
            "fine for open-ended tasks, a labelling problem for tasks with one right answer")
    if report["format"] != "text" and data.mask_prompt and 0 < train["supervised_share"] < 0.05:
        add("note", f"only {_pct(train['supervised_share'])} of tokens are trained on (answers are short "
            "next to prompts): normal for extraction tasks, but each step learns from few tokens; "
            "raise train.batch_size if the loss is noisy")
    return out


def _leakage_findings(leakage: dict) -> list[dict]:
    out = []
    for name, leak in leakage.items():
        if not leak["leaked"]:
            continue
        if leak["removed"]:
            out.append({"level": "note", "message": f"{leak['removed']} {name} rows repeated a training "
                        f"row ({leak['exact']} exactly, {leak['near']} nearly) and were removed from {name}"})
        else:
            out.append({"level": "problem", "message": f"{leak['leaked']} of {leak['rows']} {name} rows "
                        f"repeat a training row ({leak['exact']} exactly, {leak['near']} nearly): {name} "
                        "scores would be flattering; set data.clean.leakage: remove"})
    return out


def _cleaning_findings(cleaning: dict, gathered: Gathered) -> list[dict]:
    out = []
    for key, report in cleaning.items():
        path = gathered.sources[key]["path"]
        removed = report["rows_in"] - report["rows_out"]
        counts = report["counts"]
        if report["rows_in"] and removed / report["rows_in"] > 0.3:
            out.append({"level": "warning", "message": f"cleaning removed {_pct(removed / report['rows_in'])} "
                        f"of the rows of {path}; check the samples below that this is what you want"})
        if counts["empty_fields"]:
            out.append({"level": "note", "message": f"{counts['empty_fields']} rows of {path} had an empty "
                        "prompt or answer and were skipped"})
        duplicates = counts["exact_duplicates"] + counts["near_duplicates"]
        if duplicates:
            out.append({"level": "note", "message": f"{duplicates} duplicate rows removed from {path} "
                        f"({counts['exact_duplicates']} exact, {counts['near_duplicates']} near)"})
        if counts["boilerplate"]:
            out.append({"level": "note", "message": f"{counts['boilerplate']} rows of {path} answered with "
                        "canned assistant phrases and were removed (data.clean.drop_phrases)"})
    return out


def verdict(report: dict) -> str:
    problems = sum(f["level"] == "problem" for f in report["findings"])
    warnings = sum(f["level"] == "warning" for f in report["findings"])
    if problems:
        return f"fix {problems} problem{'s' * (problems > 1)} before training"
    if warnings:
        return f"ready to train, with {warnings} warning{'s' * (warnings > 1)} to read"
    return "ready to train"


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%" if share >= 0.01 or share == 0 else f"{100 * share:.1f}%"


def main(config: RunConfig) -> int:
    from tunesmith.data import doctor_report
    from tunesmith.model.load import load_tokenizer, resolve

    if config.data.folds > 1 and config.data.fold == 0:
        config = config.model_copy(update={"data": config.data.model_copy(update={"fold": 1})})
    tokenizer = load_tokenizer(resolve(config.model))
    report = diagnose(config, tokenizer)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    plot = doctor_report.histograms(report, run_dir / "plots" / "token_lengths.png")
    markdown = doctor_report.markdown(report, verdict(report), plot.relative_to(run_dir))
    _write_atomic(run_dir / "inspect.md", markdown)
    doctor_report.to_terminal(report, verdict(report), run_dir / "inspect.md", plot)
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
