"""How the data doctor shows its findings: a PNG of token lengths, Markdown, and the terminal
(where trained-on text is green and context is dim)."""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.data.clean import STEPS

LEVEL_MARK = {"problem": "PROBLEM", "warning": "warning", "note": "note"}
TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def histograms(report: dict, path: Path) -> Path:
    """Prompt, answer and total token lengths of the training split; max_seq_length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, limit = report["lengths"]["train"], report["max_seq_length"]
    panels = [("total", "prompt + answer")] if report["format"] == "text" else \
        [("prompt", "prompt (not trained on)"), ("response", "answer (trained on)"), ("total", "prompt + answer")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        values = lengths[key]
        axis.hist(values, bins=min(40, max(5, len(set(values)))), color="#4c72b0")
        axis.axvline(limit, color="#c44e52", linestyle="--", label=f"max_seq_length {limit}")
        axis.set_title("document" if report["format"] == "text" else title)
        axis.set_xlabel("tokens")
        axis.set_ylabel("examples")
        axis.legend(fontsize=8)
    figure.suptitle("Token lengths of the training examples")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def _counts_table(report: dict) -> list[str]:
    text = report["format"] == "text"
    head = "| split | rows | examples | truncated | tokens | trained-on tokens | trained-on share |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["splits"].items():
        examples = f"{s['examples']} ({s['blocks']} blocks)" if text else str(s["examples"])
        lines.append(f"| {name} | {s['rows']} | {examples} | {s['truncated']} | {s['tokens']} | "
                     f"{s['supervised_tokens']} | {100 * s['supervised_share']:.1f}% |")
    return lines


def _lengths_table(report: dict) -> list[str]:
    lines = ["| train tokens | median | p95 | p99 | max |", "|---|---:|---:|---:|---:|"]
    for key in ("prompt", "response", "total"):
        p = report["splits"]["train"][key]
        lines.append(f"| {key} | {p['median']} | {p['p95']} | {p['p99']} | {p['max']} |")
    return lines


def _cleaning_lines(report: dict) -> list[str]:
    lines = []
    for key, clean in report["cleaning"].items():
        source = report["sources"][key]
        lines.append(f"- `{source['path']}` ({source['kind']}): {clean['rows_in']} rows read, "
                     f"{clean['rows_out']} kept")
        for step in STEPS:
            count = clean["counts"][step]
            if not count:
                continue
            lines.append(f"  - {step.replace('_', ' ')}: {count}")
            for sample in clean["samples"].get(step, []):
                detail = f" — {sample['detail']}" if sample.get("detail") else ""
                lines.append(f"    - `{sample['where']}`: {sample['text']!r}{detail}")
    return lines


def _leakage_lines(report: dict) -> list[str]:
    lines = []
    for name, leak in report["leakage"].items():
        action = "removed" if leak["removed"] else "kept"
        lines.append(f"- {name}: {leak['leaked']} of {leak['rows']} rows repeat a training row "
                     f"({leak['exact']} exact, {leak['near']} near), {action}")
        for sample in leak["samples"]:
            lines.append(f"  - `{sample['where']}` repeats `{sample['repeats']}` ({sample['kind']}, "
                         f"{sample['similarity']:.2f}): {sample['text']!r}")
    return lines


def _preview_text(runs: list[tuple[str, bool]]) -> str:
    return "".join(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text for text, trained in runs)


def markdown(report: dict, verdict: str, plot: Path) -> str:
    lines = ["# Data doctor", "", f"**Verdict: {verdict}.**", ""]
    lines += [f"- {LEVEL_MARK[f['level']]}: {f['message']}" for f in report["findings"]] or ["- nothing to report"]
    folds = report.get("folds")
    lines += ["", "## Data", "", f"Format: {report['format']}; template: {report['template']}; "
              f"max_seq_length: {report['max_seq_length']}"
              + (f"; fold {folds['fold']} of {folds['k']} (fold sizes {folds['sizes']})" if folds else ""), ""]
    lines += _counts_table(report)
    lines += ["", "## Cleaning", ""] + _cleaning_lines(report)
    lines += ["", "## Leakage between splits", ""] + (_leakage_lines(report) or ["- no val/test rows"])
    lines += ["", "## Token lengths", ""] + _lengths_table(report)
    lines += ["", f"![token lengths]({plot.as_posix()})", "",
              "## Rendered examples", "", (f"Text between {TRAINED_OPEN} and {TRAINED_CLOSE} is trained on; "
                                           "the rest is context the model reads but is not scored on."), ""]
    for number, runs in enumerate(report["preview"], start=1):
        lines += [f"Example {number}:", "", "```", _preview_text(runs), "```", ""]
    return "\n".join(lines) + "\n"


def to_terminal(report: dict, verdict: str, markdown_path: Path, plot: Path) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    console.print(Text("Data doctor", style="bold"))
    for line in _counts_table(report):
        console.print(line, markup=False)
    for line in _cleaning_lines(report) + _leakage_lines(report):
        console.print(line, markup=False)
    for line in _lengths_table(report):
        console.print(line, markup=False)
    console.print(Text("Rendered examples (green: trained on; dim: context):", style="bold"))
    for runs in report["preview"]:
        text = Text()
        for piece, trained in runs:
            text.append(piece, style="green" if trained else "dim")
        console.print(text)
        console.print("")
    styles = {"problem": "bold red", "warning": "yellow", "note": "cyan"}
    for finding in report["findings"]:
        console.print(Text(f"{LEVEL_MARK[finding['level']]}: {finding['message']}", style=styles[finding["level"]]))
    console.print(Text(f"Verdict: {verdict}.", style="bold"))
    console.print(f"Written: {markdown_path}  {plot}", markup=False)
