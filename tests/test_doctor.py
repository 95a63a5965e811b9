"""`tunesmith inspect`: the data doctor's numbers on a crafted dataset, checked against prepare's
own counts and against the crafted truth; the verdict and advice; the files it writes."""

from __future__ import annotations

import math

import pytest
from helpers import qa_rows, write_jsonl

from tunesmith import config as config_module
from tunesmith.data import doctor
from tunesmith.data import prepare as prepare_module
from tunesmith.data.templates import Encoder, choose, pieces

LIMIT = 48
LONG = [{"question": f"Describe colour {i}", "answer": " ".join(["red green blue"] * (8 + i))} for i in range(5)]


def crafted_rows() -> list[dict]:
    base = qa_rows(20)
    return (base + LONG
            + [dict(base[0]), dict(base[1])]  # 2 exact duplicates
            + [{"question": "Who are you?", "answer": "As an AI language model, I am nobody."}]  # boilerplate
            + [{"question": "Blank?", "answer": ""}]  # empty answer
            + [{"question": base[2]["question"], "answer": "four, probably"}])  # same prompt, other answer


@pytest.fixture
def crafted(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", crafted_rows())
    test = write_jsonl(tmp_path / "test.jsonl", [qa_rows(1, start=5)[0],  # leaks: a train row again
                                                 *qa_rows(2, start=100)])
    config = config_module.build({"out_dir": str(tmp_path / "run"), "data": {
        "path": str(train), "test_path": str(test), "val_split": 0.0, "max_seq_length": LIMIT,
        "clean": {"leakage": "report"}}})
    return config, train, test


def test_doctor_numbers_on_a_crafted_dataset(crafted, tokenizer):
    config, train, _ = crafted
    report = doctor.diagnose(config, tokenizer)
    cleaning = report["cleaning"]["path"]
    assert (cleaning["rows_in"], cleaning["rows_out"]) == (30, 26)
    assert {k: v for k, v in cleaning["counts"].items() if v} == {
        "empty_fields": 1, "exact_duplicates": 2, "boilerplate": 1}
    assert report["leakage"]["test"]["leaked"] == 1 and report["leakage"]["test"]["exact"] == 1
    assert report["leakage"]["test"]["samples"][0]["repeats"] == f"{train}:6"
    assert report["conflicting_prompts"] == 1

    # token lengths, measured independently here
    template, encoder = choose("auto", tokenizer), Encoder(tokenizer)
    examples, _ = prepare_module.split_examples(config)
    encoded = [encoder.encode(pieces(template, e, tokenizer)) for e in examples["train"]]
    totals = [len(ids) for ids, _ in encoded]
    answers = [sum(sup) for _, sup in encoded]
    kept_answers = [sum(sup[:LIMIT]) for _, sup in encoded]
    assert report["lengths"]["train"]["total"] == totals
    assert report["lengths"]["train"]["response"] == answers
    train_stats = report["splits"]["train"]
    long_rows = sum(t > LIMIT for t in totals)
    assert long_rows == 5 and train_stats["truncated"] == 5
    assert train_stats["truncated_share"] == pytest.approx(5 / 26)
    assert train_stats["response_tokens_lost_share"] == pytest.approx(
        (sum(answers) - sum(kept_answers)) / sum(answers))
    assert train_stats["total"]["max"] == max(totals) and train_stats["total"]["median"] == sorted(totals)[12]
    assert report["suggested_max_seq_length"] == 64 * math.ceil(max(totals) / 64)

    # the same counts as prepare's manifest, which tokenizes by another route
    counts = prepare_module.prepare(config, tokenizer).manifest["counts"]
    for name in ("train", "test"):
        for key in ("examples", "truncated", "tokens", "supervised_tokens"):
            assert report["splits"][name][key] == counts[name][key], (name, key)
    assert train_stats["supervised_share"] == pytest.approx(counts["train"]["supervised_tokens"]
                                                            / counts["train"]["tokens"])

    problems = [f["message"] for f in report["findings"] if f["level"] == "problem"]
    assert len(problems) == 2
    assert problems[0].startswith(f"19% of training examples are longer than max_seq_length={LIMIT} tokens")
    assert f"raise data.max_seq_length to {report['suggested_max_seq_length']}" in problems[0]
    assert problems[1].startswith("1 of 3 test rows repeat a training row (1 exactly, 0 nearly)")
    assert doctor.verdict(report) == "fix 2 problems before training"
    assert [f["level"] for f in report["findings"]].count("warning") == 2  # small set, no validation rows


def test_preview_shows_exactly_the_trained_tokens(crafted, tokenizer):
    config, _, _ = crafted
    report = doctor.diagnose(config, tokenizer)
    first = report["preview"][0]
    assert "".join(text for text, trained in first if trained) == "1<|im_end|>"  # "What is 0 plus one?"
    assert "".join(text for text, _ in first).startswith("<|im_start|>user\nWhat is 0 plus one?")


def test_inspect_writes_markdown_and_histograms_only(cli, llama, crafted):
    config, train, test = crafted
    run_dir = config.run_dir
    result = cli("inspect", "--model", llama, "--data.path", train, "--data.test_path", test, "--out_dir", run_dir,
                 "--data.val_split", 0, "--data.max_seq_length", LIMIT, "--data.clean.leakage", "report")
    assert result.code == 0, result.err
    assert "Verdict: fix 2 problems before training." in result.out
    assert sorted(p.name for p in run_dir.iterdir()) == ["inspect.md", "plots"]  # no prepared data
    png = (run_dir / "plots" / "token_lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    markdown = (run_dir / "inspect.md").read_text()
    assert markdown.startswith("# Data doctor\n\n**Verdict: fix 2 problems before training.**")
    assert "| train | 26 | 26 | 5 |" in markdown
    assert "  - exact duplicates: 2" in markdown and f"repeats {train}:1" in markdown
    assert "«1<|im_end|>»" in markdown
    assert "![token lengths](plots/token_lengths.png)" in markdown


def test_inspect_a_clean_dataset_is_ready(cli, llama, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(250))
    result = cli("inspect", "--model", llama, "--data.path", path, "--out_dir", tmp_path / "run")
    assert result.code == 0, result.err
    assert "Verdict: ready to train." in result.out


def test_inspect_bad_data_exits_2_and_writes_nothing(cli, llama, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    result = cli("inspect", "--model", llama, "--data.path", path, "--out_dir", tmp_path / "run")
    assert result.code == 2
    assert "cannot tell the data format from the keys ['a', 'b']" in result.err
    assert not (tmp_path / "run").exists()
