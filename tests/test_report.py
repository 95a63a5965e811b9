"""report.html after `finetune` (curves and diagnosis; evaluation still to come) and after
`evaluate` with benchmarks and the bias probe (every section filled); TensorBoard scalars equal to
metrics.jsonl. The browser render check is scripts/check_report.py (needs Debian's chromium)."""

from __future__ import annotations

import base64
import io
import json

import matplotlib.image
import pytest
from bs4 import BeautifulSoup
from helpers import write_jsonl
from test_benchmarks import NEEDS_LM_EVAL, write_task

from tunesmith.evaluate.diagnose import diagnose_run
from tunesmith.report import SECTIONS
from tunesmith.train.tensorboard import read_scalars


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """A tiny full fine-tune with validation passes and TensorBoard on, run through the CLI in-process."""
    from tunesmith.cli import main

    folder = tmp_path_factory.mktemp("report")
    rows = [{"question": f"What is {i} plus one?", "answer": str(i + 1), "task": "even" if i % 2 == 0 else "odd"}
            for i in range(24)]
    data = write_jsonl(folder / "sums.jsonl", rows)
    run_dir = folder / "run"
    flags = ["--model", str(tiny_models("llama")), "--method", "full", "--data.path", str(data), "--out_dir",
             str(run_dir), "--data.val_split", "0.2", "--data.test_split", "0.25", "--train.device", "cpu",
             "--train.precision", "fp32"]
    code = main(["finetune", *flags, "--train.max_steps", "24", "--train.batch_size", "4", "--train.micro_batch_size",
                 "4", "--train.learning_rate", "1e-2", "--train.eval_interval", "8", "--train.log_interval", "2",
                 "--train.warmup_steps", "2", "--train.tensorboard", "true"])
    assert code == 0
    report_after_finetune = (run_dir / "report.html").read_text()
    return run_dir, flags, report_after_finetune


def _sections(html: str) -> dict[str, BeautifulSoup]:
    soup = BeautifulSoup(html, "html.parser")
    return {key: soup.find("section", id=key) for key, _ in SECTIONS}


def test_finetune_writes_the_report_with_curves_and_diagnosis(trained):
    run_dir, _, html = trained
    sections = _sections(html)
    assert all(sections.values()), [key for key, section in sections.items() if section is None]
    images = sections["curves"].find_all("img")
    assert [img["alt"] for img in images] == ["Training and validation loss", "Learning rate", "Throughput (tokens/s)"]
    for img in images:  # embedded, and real PNGs
        prefix, data = img["src"].split(",", 1)
        assert prefix == "data:image/png;base64"
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 500
    found = diagnose_run(run_dir)  # this run's diagnosis, in full (its logic: tests/test_diagnose.py)
    assert sections["diagnosis"].find("p", class_="verdict").get_text() == found.headline
    assert [li.get_text() for li in sections["diagnosis"].find_all("li")] == found.findings + found.advice
    assert found.findings[0].startswith("Training loss fell from")
    assert "learning_rate: 0.01" in sections["config"].get_text()
    data_rows = [[td.get_text() for td in tr.find_all("td")] for tr in sections["data"].find_all("tr")[1:]]
    assert [row[0] for row in data_rows] == ["train", "val", "test"] and data_rows[2][1] == "6"
    for key in ("evaluation", "errors", "samples"):
        assert f"Not evaluated yet: tunesmith evaluate {run_dir}" in sections[key].get_text()
    assert "tunesmith evaluate" in sections["benchmarks"].get_text() and "--bias" in sections["bias"].get_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html  # self-contained


def test_tensorboard_scalars_equal_metrics_jsonl(trained):
    run_dir, _, _ = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(run_dir / "tensorboard")
    assert set(scalars) == {"train/loss", "val/loss", "train/learning_rate", "train/tokens_per_second",
                            "train/grad_norm"}
    for key, tag in (("loss", "train/loss"), ("val_loss", "val/loss"), ("lr", "train/learning_rate"),
                     ("grad_norm", "train/grad_norm"), ("tokens_per_second", "train/tokens_per_second")):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected]
        assert [value for _, value in scalars[tag]] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert [step for step, _ in scalars["val/loss"]] == [8, 16, 24]


@NEEDS_LM_EVAL
def test_report_after_evaluate_has_every_section_filled(trained, cli, tmp_path):
    run_dir, flags, _ = trained
    tasks_dir = write_task(tmp_path / "tasks")
    result = cli("evaluate", *flags, "--eval.max_new_tokens", 4, "--tasks", "tiny_mc", "--eval.tasks_dir",
                 tasks_dir, "--bias")
    assert result.code == 0, result.err
    assert f"Report: {run_dir / 'report.html'}" in result.out
    html = (run_dir / "report.html").read_text()
    assert "Not evaluated yet" not in html and "No benchmarks run" not in html and "No bias probe run" not in html
    sections = _sections(html)
    metrics = [tr.find("td").get_text() for tr in sections["evaluation"].find_all("tr")[1:]]
    assert metrics == ["test_loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL"]
    assert [th.get_text() for th in sections["evaluation"].find_all("th")] == ["metric", "base", "tuned", "change"]
    headings = [h.get_text() for h in sections["errors"].find_all("h3")]
    assert headings[:2] == ["Failures by task", "Failures by reference length"]
    assert any(h.startswith("Regressions") for h in headings)
    sample_rows = sections["samples"].find_all("tr")[1:]
    assert len(sample_rows) == 6  # every test row (fewer than the 12 shown at most)
    questions = {tr.find("td").get_text() for tr in sample_rows}
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert questions == {p["prompt"][-1]["content"] for p in predictions}
    benchmark_cells = [td.get_text() for td in sections["benchmarks"].find_all("td")]
    assert benchmark_cells[:2] == ["tiny_mc", "acc"] and len(benchmark_cells) == 5  # base, tuned, change
    bias_rows = [[td.get_text() for td in tr.find_all("td")] for tr in sections["bias"].find_all("tr")[1:3]]
    assert [row[0] for row in bias_rows] == ["base", "tuned"]
    assert all(row[1].endswith(f"of {len(json.loads((run_dir / 'eval' / 'bias.json').read_text())['pairs'])}")
               for row in bias_rows)


def test_report_verb_rewrites_the_report(trained, cli):
    run_dir, _, _ = trained
    (run_dir / "report.html").unlink()
    result = cli("report", run_dir)
    assert result.code == 0, result.err
    assert result.out.strip() == f"Report: {run_dir / 'report.html'}"
    assert all(_sections((run_dir / "report.html").read_text()).values())


def test_report_of_a_missing_run_is_one_line(cli, tmp_path):
    result = cli("report", tmp_path / "nothing-here")
    assert result.code == 2
    assert result.err.strip() == f"tunesmith: config error: config file {tmp_path / 'nothing-here'} not found"


def test_tensorboard_after_a_resume_has_each_step_once(cli, llama, tmp_path):
    """Resuming from step 3 redoes steps 4-6: their first TensorBoard events are purged, as their
    metrics.jsonl records are."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"Say {i}.", "answer": f"{i} {i}"} for i in range(12)])
    flags = ["finetune", "--model", llama, "--method", "full", "--data.path", data, "--out_dir", tmp_path / "run",
             "--train.max_steps", 6, "--train.batch_size", 2, "--train.micro_batch_size", 2, "--train.warmup_steps", 0,
             "--train.eval_interval", 0, "--train.log_interval", 1, "--train.save_interval", 3,
             "--train.save_total_limit", 5, "--train.precision", "fp32", "--train.device", "cpu",
             "--train.tensorboard", "true"]
    assert cli(*flags).code == 0
    assert cli(*flags, "--resume", tmp_path / "run" / "step-000003").code == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = read_scalars(tmp_path / "run" / "tensorboard")["train/loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in losses] == pytest.approx([r["loss"] for r in records if "loss" in r], rel=1e-6)
