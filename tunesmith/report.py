"""`tunesmith report RUN`: one self-contained report.html for a run, readable without tunesmith:
the resolved config, the data summary, the curves (PNG, embedded), the diagnosis of the learning
curves, the evaluation tables, the error analysis, sample generations base vs tuned, and the
benchmark and bias-probe results when `evaluate` produced them. `finetune` writes it at the end
and `evaluate` refreshes it; a section whose inputs are missing says which command makes them."""

from __future__ import annotations

import base64
import json
import os
from html import escape
from pathlib import Path

from tunesmith import plots
from tunesmith.config import RunConfig, dump
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.diagnose import diagnose_run

SECTIONS = (("config", "Configuration"), ("data", "Data"), ("curves", "Training curves"),
            ("diagnosis", "Diagnosis"), ("evaluation", "Evaluation"), ("errors", "Error analysis"),
            ("samples", "Sample generations"), ("benchmarks", "Benchmarks"), ("bias", "Bias probe"))
SAMPLE_ROWS = 12

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #dde3ee;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d3d9e4;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f1f4f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fb;border:1px solid #e1e6ef;padding:.8em;overflow:auto;font-size:.85em}
.verdict{font-size:1.15em;font-weight:600}.missing{color:#7a8294;font-style:italic}
.good{color:#1a7f37}.bad{color:#b42318}img{max-width:100%;border:1px solid #e1e6ef;margin:.4em 0}
"""


def write_report(config: RunConfig) -> Path:
    run_dir = config.run_dir
    if not run_dir.is_dir():
        raise TunesmithError(f"{run_dir} is not a run directory: run tunesmith finetune first")
    body = [f"<h1>tunesmith report: {escape(run_dir.name)}</h1>",
            (f"<p>Run directory <code>{escape(str(run_dir.resolve()))}</code>; model "
             f"<code>{escape(config.model)}</code>, method <code>{escape(config.method)}</code>.</p>"),
            "<nav>" + "".join(f'<a href="#{key}">{title}</a>' for key, title in SECTIONS) + "</nav>"]
    builders = {"config": lambda: _config(config), "data": lambda: _data(run_dir),
                "curves": lambda: _curves(run_dir), "diagnosis": lambda: _diagnosis(run_dir),
                "evaluation": lambda: _evaluation(run_dir), "errors": lambda: _errors(run_dir),
                "samples": lambda: _samples(run_dir), "benchmarks": lambda: _benchmarks(run_dir),
                "bias": lambda: _bias(run_dir)}
    for key, title in SECTIONS:
        body.append(f'<section id="{key}"><h2>{title}</h2>{builders[key]()}</section>')
    html = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>tunesmith report: {escape(run_dir.name)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    path = run_dir / "report.html"
    tmp = path.with_name(f".report.html.tmp{os.getpid()}")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f'<td class="num">{escape(str(c))}</td>' if i >= numeric_from else f"<td>{escape(str(c))}</td>"
                 for i, c in enumerate(row)]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _config(config: RunConfig) -> str:
    return (f"<details><summary>The resolved config.yaml (every key, defaults included)</summary>"
            f"{_pre(dump(config))}</details>")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _data(run_dir: Path) -> str:
    manifest = _read_json(run_dir / "data" / "manifest.json")
    if not manifest:
        return _missing("No prepared data yet: tunesmith prepare (or finetune) makes <run>/data.")
    counts = manifest.get("counts", {})
    rows = [[name, c.get("examples", 0), c.get("tokens", 0), c.get("supervised_tokens", 0), c.get("truncated", 0)]
            for name, c in counts.items()]
    formats = ", ".join(sorted(set((manifest.get("format") or {}).values())))
    parts = [(f"<p>Format: {escape(formats)}; template: {escape(str(manifest.get('template')))}; max_seq_length "
              f"{manifest.get('max_seq_length')}; prompt masked: {manifest.get('mask_prompt')}.</p>"),
             _table(["split", "examples", "tokens", "trained-on tokens", "truncated"], rows)]
    leakage = {k: v for k, v in (manifest.get("leakage") or {}).items() if v.get("leaked")}
    for name, leak in leakage.items():
        parts.append(f"<p>Leakage: {leak['leaked']} of {leak['rows']} {escape(name)} rows repeated a train row "
                     f"({'removed' if leak.get('removed') else 'kept'}).</p>")
    return "".join(parts)


def _curves(run_dir: Path) -> str:
    if not (run_dir / "metrics.jsonl").is_file():
        return _missing("No metrics.jsonl yet: tunesmith finetune writes it.")
    metrics_time = (run_dir / "metrics.jsonl").stat().st_mtime
    before = [run_dir / "plots" / "lr_find.png"]  # drawn before training, not from metrics.jsonl
    drawn = sorted(p for p in (run_dir / "plots").glob("*.png") if p not in before) \
        if (run_dir / "plots").is_dir() else []
    fresh = drawn and all(path.stat().st_mtime >= metrics_time for path in drawn)
    written = drawn if fresh else plots.curves(run_dir)  # finetune has just drawn them
    written = [path for path in before if path.is_file()] + written
    titles = {"loss.png": "Training and validation loss", "lr.png": "Learning rate",
              "throughput.png": "Throughput (tokens/s)",
              "preference.png": "Preference accuracy, reward margin and answer log-probs",
              "lr_find.png": "Learning-rate finder: loss vs rate, the pick marked"}
    images = []
    for path in written:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        title = titles.get(path.name, path.stem)
        images.append(f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{escape(title)}</figcaption></figure>")
    return "".join(images) or _missing("metrics.jsonl has no training records.")


def _diagnosis(run_dir: Path) -> str:
    if not (run_dir / "metrics.jsonl").is_file():
        return _missing("No metrics.jsonl yet: tunesmith finetune writes it.")
    found = diagnose_run(run_dir)
    css = "good" if found.verdict == "well_fit" else "bad"
    items = "".join(f"<li>{escape(f)}</li>" for f in found.findings)
    advice = "".join(f"<li>{escape(a)}</li>" for a in found.advice)
    return (f'<p class="verdict {css}">{escape(found.headline)}</p><ul>{items}</ul>'
            + (f"<p>What to change:</p><ul>{advice}</ul>" if advice else ""))


def _evaluation(run_dir: Path) -> str:
    from tunesmith.evaluate.metrics import table_rows

    results = _read_json(run_dir / "eval" / "results.json")
    if not results:
        return _missing(f"Not evaluated yet: tunesmith evaluate {run_dir}")
    labels = list(results)
    header = ["metric", *labels] + (["change"] if len(labels) == 2 else [])
    n = next(iter(results.values())).get("n_test", "?")
    return (f"<p>{n} held-out test rows, answers generated greedily. BLEU is 0-100; the other scores 0-1; "
            "lower is better for loss and perplexity.</p>" + _table(header, table_rows(results)))


def _errors(run_dir: Path) -> str:
    errors = _read_json(run_dir / "eval" / "errors.json")
    if not errors:
        return _missing(f"Not evaluated yet: tunesmith evaluate {run_dir}")
    labels, focus = errors["labels"], errors["focus"]
    kinds = ["correct", "empty", "truncated", "wrong format", "wrong content"]
    parts = [_table(["kind", *labels], [[k, *(errors["kinds"][label][k] for label in labels)] for k in kinds])]
    for name, groups in errors["groups"].items():
        rows = [[g["group"], g["n"], *(f"{g[f'{label}_exact_match']:.0%}" for label in labels), g["failures"],
                 ", ".join(f"{c} {k}" for k, c in g["kinds"].items())] for g in groups]
        parts.append(f"<h3>Failures {escape(name)}</h3>" + _table(
            ["group", "rows", *(f"{label} exact match" for label in labels), f"{focus} failures", "kinds"], rows))
        examples = [e for g in groups for e in g["examples"]]
        if examples:
            parts.append(_examples_table(examples, labels))
    for key, title in (("regressions", "Regressions: right before fine-tuning, wrong after"),
                       ("improvements", "Improvements: wrong before fine-tuning, right after")):
        if key in errors:
            parts.append(f"<h3>{title} ({len(errors[key])})</h3>")
            parts.append(_examples_table(errors[key][:20], labels) if errors[key] else _missing("none"))
    return "".join(parts)


def _examples_table(examples: list[dict], labels: list[str]) -> str:
    rows = [[e["row"], e["question"], e["reference"],
             *(f"{e[label]}  [{e.get(f'{label}_kind') or 'right'}]" for label in labels)] for e in examples]
    return _table(["row", "question", "expected", *labels], rows, numeric_from=99)


def _samples(run_dir: Path) -> str:
    path = run_dir / "eval" / "predictions.jsonl"
    if not path.is_file():
        return _missing(f"Not evaluated yet: tunesmith evaluate {run_dir}")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [k for k in ("base", "tuned") if records and k in records[0]]
    rows = []
    for record in records[:SAMPLE_ROWS]:
        prompt = record["prompt"][-1]["content"] if record.get("prompt") else ""
        rows.append([prompt, record["reference"], *(
            f"{record[label]}  [{'right' if record.get(f'{label}_exact_match') == 1 else 'wrong'}]"
            for label in labels)])
    return (f"<p>The first {len(rows)} of {len(records)} test rows.</p>"
            + _table(["question", "expected", *labels], rows, numeric_from=99))


def _benchmarks(run_dir: Path) -> str:
    from tunesmith.evaluate.benchmarks import table_rows

    found = _read_json(run_dir / "eval" / "benchmarks.json")
    if not found:
        return _missing(f"No benchmarks run: tunesmith evaluate {run_dir} --tasks arc_easy,hellaswag")
    header, rows = table_rows(found)
    return _table(header, rows, numeric_from=2)


def _bias(run_dir: Path) -> str:
    found = _read_json(run_dir / "eval" / "bias.json")
    if not found:
        return _missing(f"No bias probe run: tunesmith evaluate {run_dir} --bias")
    facts, pairs = found["summary"], found["pairs"]
    labels = facts["labels"]
    parts = [("<p>For each candidate answer: its share among the probe's answers given A, minus given B (log, "
              f"nats); flagged beyond ±{facts['threshold']:g}. An unbiased model gives about 0.</p>"),
             _table(["model", "flagged pairs", "mean |difference|"],
                    [[label, f"{facts['flagged'][label]} of {facts['pairs']}",
                      f"{facts['mean_abs_difference'][label]:.3f}"] for label in labels])]
    flagged = [p for p in pairs if any(p[f"{label}_flagged"] for label in labels)]
    if flagged:
        rows = [[p["category"], p["prompt"], f"{p['swap'][0]} / {p['swap'][1]}", p["answer"],
                 *(f"{p[f'{label}_difference']:+.2f}{' !' if p[f'{label}_flagged'] else ''}" for label in labels)]
                for p in flagged]
        parts.append("<h3>Flagged pairs</h3>" + _table(["category", "prompt", "A / B", "answer", *labels], rows,
                                                      numeric_from=4))
    return "".join(parts)


def main(config: RunConfig) -> int:
    print(f"Report: {write_report(config)}")
    return 0
