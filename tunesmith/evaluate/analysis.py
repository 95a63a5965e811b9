"""Error analysis: which answers failed and how, grouped so a person sees a pattern, not a list.

Every answer that is not an exact match gets one kind:
    empty          nothing was generated
    truncated      the answer ran into eval.max_new_tokens without finishing
    wrong format   its shape differs from the reference's (a sentence where one word was wanted,
                   "March 5, 2021" where "2021-03-05" was wanted, text where JSON was wanted)
    wrong content  the right shape, the wrong answer
Failures are grouped by a field of the data when there is one (eval.group_by, or a field named
task/category/type/...), by reference length, and by kind, each group with examples; and the
rows the tuned model got wrong that the base model got right are listed (regressions).
"""

from __future__ import annotations

import json
import re
from collections import Counter

from tunesmith.evaluate.metrics import exact_match, token_f1

KINDS = ("empty", "truncated", "wrong format", "wrong content")
# Field names that usually hold a category worth grouping by, in order of preference.
GROUP_FIELDS = ("task", "task_type", "type", "category", "subject", "topic", "skill", "domain", "kind", "source")
MAX_GROUP_VALUES = 30
LENGTH_BUCKETS = ((3, "1-3 words"), (15, "4-15 words"), (None, "16+ words"))


def shape(text: str) -> str:
    """A coarse, explainable description of how an answer looks (not what it says)."""
    text = text.strip()
    if not text:
        return "empty"
    if text[0] in "[{":
        try:
            json.loads(text)
            return "JSON"
        except ValueError:
            pass
    if text.startswith("```"):
        return "code block"
    if text.lower().rstrip(".!") in ("yes", "no", "true", "false"):
        return "yes/no"
    if re.fullmatch(r"[-+]?\d[\d,]*(\.\d+)?%?", text):
        return "number"
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and sum(bool(re.match(r"\s*([-*•]|\d+[.)])\s", line)) for line in lines) >= 2:
        return "list"
    words = text.split()
    if len(words) == 1:
        return f"one token like {_pattern(text)}"
    if len(words) <= 5:
        return "a few words"
    return "several lines of text" if len(lines) > 1 else "a sentence or more"


def _pattern(word: str) -> str:
    """Runs of digits → 9, of letters → a; punctuation kept: 2021-03-05 → 9-9-9, Paris → a."""
    return re.sub(r"[^\W\d_]+", "a", re.sub(r"\d+", "9", word))


def failure_kind(answer: str, reference: str, hit_limit: bool) -> str:
    if not answer.strip():
        return "empty"
    if hit_limit:
        return "truncated"
    if shape(answer) != shape(reference):
        return "wrong format"
    return "wrong content"


def row_outcomes(rows: list[dict], answers: list[str], truncated: set[int], normalized) -> list[dict]:
    """Per row: correct?, token F1, and the failure kind (None when correct)."""
    outcomes = []
    for index, (row, answer) in enumerate(zip(rows, answers)):
        correct = exact_match(answer, row["reference"], normalized) == 1.0
        kind = None if correct else failure_kind(answer, row["reference"], index in truncated)
        outcomes.append({"correct": correct, "token_f1": token_f1(answer, row["reference"]), "kind": kind})
    return outcomes


def group_field(rows: list[dict], wanted: str | None) -> str | None:
    """The data field to group by: the configured one, else the first usual name with 2-30 values."""
    extras = [row.get("extra") or {} for row in rows]
    if wanted:
        return wanted if any(wanted in extra for extra in extras) else None
    for name in GROUP_FIELDS:
        values = {str(extra[name]) for extra in extras if name in extra}
        if 2 <= len(values) <= MAX_GROUP_VALUES:
            return name
    return None


def length_bucket(reference: str) -> str:
    words = len(reference.split())
    return next(label for limit, label in LENGTH_BUCKETS if limit is None or words <= limit)


def analyse(rows: list[dict], answers: dict[str, list[str]], truncated: dict[str, set[int]], normalized,
            group_by: str | None = None, examples: int = 3) -> dict:
    """The whole analysis as plain data (written as eval/errors.json, rendered to errors.md)."""
    labels = list(answers)
    outcomes = {label: row_outcomes(rows, answers[label], truncated.get(label, set()), normalized)
                for label in labels}
    focus = labels[-1]  # the tuned model when there is one
    field_name = group_field(rows, group_by)
    groupings = {}
    if field_name:
        groupings[f"by {field_name}"] = [str((row.get("extra") or {}).get(field_name, "(none)")) for row in rows]
    groupings["by reference length"] = [length_bucket(row["reference"]) for row in rows]
    result = {"labels": labels, "focus": focus, "n_rows": len(rows), "group_field": field_name,
              "kinds": {label: _kind_counts(outcomes[label]) for label in labels},
              "groups": {name: _groups(keys, rows, answers, outcomes, focus, examples)
                         for name, keys in groupings.items()},
              "examples_by_kind": _examples_by_kind(rows, answers, outcomes[focus], focus, examples)}
    if group_by and not field_name:
        result["note"] = f"eval.group_by={group_by}: no test row has that field"
    if len(labels) == 2:
        result["regressions"] = _changed(rows, answers, outcomes, labels, worse=True)
        result["improvements"] = _changed(rows, answers, outcomes, labels, worse=False)
    return result


def _kind_counts(outcomes: list[dict]) -> dict:
    counts = Counter(o["kind"] for o in outcomes if o["kind"])
    return {"correct": sum(o["correct"] for o in outcomes), **{kind: counts.get(kind, 0) for kind in KINDS}}


def _question(row: dict) -> str:
    messages = row.get("messages") or []
    return messages[-1]["content"] if messages else row.get("prompt", "")


def _example(row: dict, index: int, answers: dict, outcomes: dict) -> dict:
    return {"row": index, "where": row.get("where", ""), "question": _question(row), "reference": row["reference"],
            **{label: answers[label][index] for label in answers},
            **{f"{label}_kind": outcomes[label][index]["kind"] for label in outcomes}}


def _groups(keys: list[str], rows, answers, outcomes, focus: str, examples: int) -> list[dict]:
    groups = []
    for key in sorted(set(keys), key=lambda k: (-keys.count(k), k)):
        members = [i for i, k in enumerate(keys) if k == key]
        group = {"group": key, "n": len(members)}
        for label in answers:
            group[f"{label}_exact_match"] = sum(outcomes[label][i]["correct"] for i in members) / len(members)
            group[f"{label}_token_f1"] = sum(outcomes[label][i]["token_f1"] for i in members) / len(members)
        failed = [i for i in members if not outcomes[focus][i]["correct"]]
        group["failures"] = len(failed)
        group["kinds"] = dict(Counter(outcomes[focus][i]["kind"] for i in failed))
        group["examples"] = [_example(rows[i], i, answers, outcomes) for i in failed[:examples]]
        groups.append(group)
    return groups


def _examples_by_kind(rows, answers, focus_outcomes, focus: str, examples: int) -> dict:
    found: dict[str, list[dict]] = {}
    for index, outcome in enumerate(focus_outcomes):
        kind = outcome["kind"]
        if kind and len(found.setdefault(kind, [])) < examples:
            found[kind].append({"row": index, "question": _question(rows[index]),
                                "reference": rows[index]["reference"], "answer": answers[focus][index]})
    return found


def _changed(rows, answers, outcomes, labels, worse: bool) -> list[dict]:
    base, tuned = labels
    changed = []
    for index in range(len(rows)):
        was, now = outcomes[base][index]["correct"], outcomes[tuned][index]["correct"]
        if (was and not now) if worse else (now and not was):
            changed.append(_example(rows[index], index, answers, outcomes))
    return changed


def summary_lines(analysis: dict) -> list[str]:
    """A few lines for the terminal: failure kinds per model, regressions, the worst group."""
    lines = []
    n = analysis["n_rows"]
    for label, counts in analysis["kinds"].items():
        failed = n - counts["correct"]
        kinds = ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k]) or "none"
        lines.append(f"{label}: {failed} of {n} answers wrong ({kinds})")
    if "regressions" in analysis:
        lines.append(f"Regressions (right before fine-tuning, wrong after): {len(analysis['regressions'])}; "
                     f"improvements (wrong before, right after): {len(analysis['improvements'])}")
    for name, groups in analysis["groups"].items():
        if len(groups) > 1:
            focus = analysis["focus"]
            worst = min(groups, key=lambda g: g[f"{focus}_exact_match"])
            lines.append(f"Weakest group {name}: {worst['group']} ({worst['n']} rows, exact match "
                         f"{worst[f'{focus}_exact_match']:.0%})")
    return lines


def markdown(analysis: dict) -> str:
    labels, focus = analysis["labels"], analysis["focus"]
    out = ["# Error analysis", "", f"{analysis['n_rows']} test rows. Kinds of failure per model:", "",
           "| kind | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for kind in ("correct", *KINDS):
        out.append(f"| {kind} | " + " | ".join(str(analysis["kinds"][label][kind]) for label in labels) + " |")
    if analysis.get("note"):
        out += ["", analysis["note"]]
    for name, groups in analysis["groups"].items():
        out += ["", f"## Failures {name}", "", "| group | rows | " + " | ".join(f"{label} exact match"
                for label in labels) + f" | {focus} failures | kinds |", "|---|---|" + "---|" * (len(labels) + 2)]
        for group in groups:
            kinds = ", ".join(f"{count} {kind}" for kind, count in group["kinds"].items())
            out.append(f"| {_cell(group['group'])} | {group['n']} | " + " | ".join(
                f"{group[f'{label}_exact_match']:.0%}" for label in labels) + f" | {group['failures']} | {kinds} |")
        for group in groups:
            if group["examples"]:
                out += ["", f"### {_cell(group['group'])}: examples of failures", ""]
                out += [_example_line(example, labels) for example in group["examples"]]
    for title, key in (("Regressions: right before fine-tuning, wrong after", "regressions"),
                       ("Improvements: wrong before fine-tuning, right after", "improvements")):
        if key in analysis:
            out += ["", f"## {title} ({len(analysis[key])})", ""]
            out += [_example_line(example, labels) for example in analysis[key][:20]] or ["(none)"]
    return "\n".join(out) + "\n"


def _example_line(example: dict, labels: list[str]) -> str:
    answers = "; ".join(f"{label}: {_cell(example[label])!s} ({example[f'{label}_kind'] or 'right'})"
                        for label in labels)
    return f"- row {example['row']}: {_cell(example['question'])} → expected {_cell(example['reference'])}; {answers}"


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
