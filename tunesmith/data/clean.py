"""Cleaning, step by step, each counted with a few examples of what it changed or removed.

    empty_fields       rows with an empty prompt or response (drop_empty)
    whitespace         CRLF, trailing spaces, NBSP / zero-width characters, runs of blank lines
    prefixes           configured prefixes ("Q. ", "A: ") cut from the start of messages
    identical_pairs    preference pairs whose chosen and rejected answers are the same (nothing to learn)
    boilerplate        rows whose response contains a canned phrase ("As an AI language model"); in
                       preference data only the chosen / desirable answer is looked at
    exact_duplicates   the same prompt and response again (case, spacing, punctuation ignored)
    near_duplicates    prompt and response both nearly the same (MinHash, see dedup.py)

The order matters: text is normalised before it is compared, so "Paris " and "Paris" are one row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from tunesmith.data import dedup
from tunesmith.data.formats import PREFERENCE_FORMATS, SHAPES, Example, to_example

STEPS = ("empty_fields", "whitespace", "prefixes", "identical_pairs", "boilerplate", "exact_duplicates",
         "near_duplicates")
SAMPLES_PER_STEP = 3
ODD_SPACES = str.maketrans({"\u00a0": " ", "\u2007": " ", "\u202f": " ", "\u3000": " ",
                            "\u200b": None, "\u200c": None, "\u200d": None, "\u2060": None, "\ufeff": None})
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


@dataclass
class Report:
    """What cleaning did to one source: rows in and out, and per step a count and examples."""

    rows_in: int = 0
    rows_out: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    samples: dict[str, list[dict]] = field(default_factory=lambda: {step: [] for step in STEPS})

    def note(self, step: str, where: str, text: str, detail: str = "") -> None:
        self.counts[step] += 1
        if len(self.samples[step]) < SAMPLES_PER_STEP:
            sample = {"where": where, "text": excerpt(text)}
            if detail:
                sample["detail"] = detail
            self.samples[step].append(sample)

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "counts": dict(self.counts),
                "samples": {k: v for k, v in self.samples.items() if v}}


def excerpt(text: str, limit: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def empty_fields(row: dict, fmt: str) -> list[str]:
    """The required fields of `row` that are missing or blank for format `fmt`."""
    if fmt in ("messages", "sharegpt"):
        turns = row.get("messages" if fmt == "messages" else "conversations")
        if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
            return []  # malformed, not empty: formats reports it
        content = turns[-1].get("content" if fmt == "messages" else "value")
        return ["last answer"] if content is None or (isinstance(content, str) and not content.strip()) else []
    if fmt == "text":
        return [] if _filled(row.get("text")) else ["text"]
    if fmt in PREFERENCE_FORMATS:
        keys = {"preference": ("prompt", "chosen", "rejected"), "hh": ("chosen", "rejected"),
                "kto": ("prompt", "completion")}[fmt]
        return [k for k in keys if not _filled(row.get(k))]
    for name, prompt_key, _, response_key in SHAPES:
        if name == fmt and prompt_key in row and response_key in row:
            return [k for k in (prompt_key, response_key) if not _filled(row.get(k))]
    return []


def _filled(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip()) \
        and not (isinstance(value, float) and math.isnan(value))


def to_examples(rows: list[tuple[dict, str]], fmt: str, drop_empty: bool, report: Report) -> list[Example]:
    """Rows to examples; with drop_empty, rows with blank required fields are counted, not fatal."""
    examples = []
    for row, where in rows:
        if drop_empty:
            blank = empty_fields(row, fmt)
            if blank:
                shown = " / ".join(f"{k}={str(v)[:40]!r}" for k, v in row.items() if isinstance(v, str))
                report.note("empty_fields", where, shown, f"empty: {', '.join(blank)}")
                continue
        examples.append(to_example(row, where, fmt))
    return examples


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(ODD_SPACES)
    text = re.sub(r"[ \t]+\n", "\n", text)  # trailing spaces; indentation is left alone
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def strip_prefixes(text: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        if prefix and text.startswith(prefix):
            return text[len(prefix):].lstrip()
    return text


def _rewrite(example: Example, change) -> Example:
    messages = [{**m, "content": change(m["content"])} for m in example.messages]
    rejected = change(example.rejected) if example.rejected is not None else None
    return replace(example, messages=messages, instruction=change(example.instruction),
                   input=change(example.input), rejected=rejected)


def boilerplate_phrase(example: Example, phrases: list[str]) -> str | None:
    """The first canned phrase found in an assistant turn (apostrophe style and case ignored)."""
    lowered = [p.casefold().translate(APOSTROPHES) for p in phrases if p]
    if example.label is False:
        return None  # an undesirable answer is meant to be bad
    for message in example.messages:
        if message["role"] != "assistant":
            continue
        text = message["content"].casefold().translate(APOSTROPHES)
        for phrase in lowered:
            if phrase in text:
                return phrase
    return None


def clean(examples: list[Example], settings, report: Report, fmt: str = "") -> list[Example]:
    """Apply every enabled step of data.clean in order; `report` counts and samples each. Canned
    phrases are looked for in answers only: a document (fmt text) may quote them."""
    out = []
    for example in examples:
        if settings.whitespace:
            tidy = _rewrite(example, normalize_whitespace)
            if tidy.messages != example.messages or tidy.rejected != example.rejected:
                report.note("whitespace", example.where, example.reference)
            example = tidy
        if settings.strip_prefixes:
            stripped = _rewrite(example, lambda t: strip_prefixes(t, settings.strip_prefixes))
            if stripped.messages != example.messages:
                report.note("prefixes", example.where, example.messages[0]["content"])
            example = stripped
        if any(not m["content"].strip() for m in example.messages if m["role"] == "assistant") \
                or (example.rejected is not None and not example.rejected.strip()):
            report.note("empty_fields", example.where, example.messages[0]["content"], "empty after cleaning")
            continue
        if example.rejected is not None and dedup.normalized(example.rejected) == dedup.normalized(example.reference):
            report.note("identical_pairs", example.where, example.reference, "chosen = rejected")
            continue
        phrase = None if fmt == "text" else boilerplate_phrase(example, settings.drop_phrases)
        if phrase:
            report.note("boilerplate", example.where, example.reference, f"contains {phrase!r}")
            continue
        out.append(example)
    kept, matches = dedup.deduplicate(out, settings.dedup, settings.near_dup_threshold)
    for match in matches:
        step = "exact_duplicates" if match.kind == "exact" else "near_duplicates"
        similarity = "" if match.kind == "exact" else f" ({match.similarity:.2f} similar)"
        report.note(step, out[match.index].where, _whole(out[match.index]),
                    f"repeats {out[match.of].where}{similarity}")
    return kept


def _whole(example: Example) -> str:
    return " | ".join(m["content"] for m in example.messages)
