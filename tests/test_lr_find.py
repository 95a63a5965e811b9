"""The learning-rate finder: the pick rule, the restore, and `learning_rate: auto` end to end."""

from __future__ import annotations

import json
import math

import pytest
from helpers import fast_train_flags, qa_rows, write_jsonl
from safetensors.torch import load_file

from tunesmith.train import lr_find


def test_the_pick_is_a_tenth_of_the_rate_with_the_lowest_smoothed_loss():
    rates = [10 ** (-6 + k / 4) for k in range(20)]
    smoothed = [5.0 - 0.1 * k if k <= 12 else 5.0 - 1.2 + (k - 12) for k in range(20)]  # lowest at k = 12
    finding = lr_find._pick(rates, smoothed, smoothed, 1.0, stopped=False)
    assert finding.lowest_at == pytest.approx(rates[12])
    assert finding.pick == pytest.approx(rates[12] / 10)


def test_a_non_finite_loss_is_never_the_lowest():
    rates = [1e-5, 1e-4, 1e-3]
    finding = lr_find._pick(rates, [3.0, 2.0, math.nan], [3.0, 2.0, math.nan], 1.0, stopped=True)
    assert finding.lowest_at == 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lr-data") / "d.jsonl", qa_rows(48))


def _flags(llama, data, out, rate):
    return ["finetune", "--model", llama, "--data.path", data, "--out_dir", out, "--train.learning_rate", rate,
            "--lora.r", 4, "--lora.dropout", 0.1, *fast_train_flags(max_steps=4, batch=4, micro=2)]


def test_auto_trains_exactly_as_the_picked_rate_written_in_the_config(cli, llama, data, tmp_path):
    """The finder puts weights, optimizer and random state back: an auto run equals, bit for bit, a run
    given the rate it picked (LoRA dropout on, so the random state matters)."""
    auto = cli(*_flags(llama, data, tmp_path / "auto", "auto"))
    assert auto.code == 0, auto.err
    finding = json.loads((tmp_path / "auto" / "lr_find.json").read_text())
    assert len(finding["rates"]) >= 10 and finding["pick"] == pytest.approx(finding["lowest_at"] / 10)
    assert f"picked {finding['pick']:.2e}" in auto.err and "learning-rate finder" in auto.out
    assert (tmp_path / "auto" / "plots" / "lr_find.png").stat().st_size > 1000
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert max(lr for lr in lrs if lr is not None) == pytest.approx(finding["pick"])

    given = cli(*_flags(llama, data, tmp_path / "given", repr(finding["pick"])))
    assert given.code == 0, given.err
    ours = load_file(str(tmp_path / "auto" / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "given" / "final" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key
    assert "Learning-rate finder: loss vs rate" in (tmp_path / "auto" / "report.html").read_text()


def test_lr_find_verb_prints_the_pick_and_writes_the_plot(cli, llama, data, tmp_path):
    result = cli("lr-find", "--model", llama, "--data.path", data, "--out_dir", tmp_path / "run",
                 "--train.batch_size", 4, "--train.precision", "fp32", "--train.device", "cpu")
    assert result.code == 0, result.err
    finding = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert f"--train.learning_rate {finding['pick']:.2e}" in result.out
    assert (tmp_path / "run" / "plots" / "lr_find.png").is_file()
    assert not (tmp_path / "run" / "final").exists()  # nothing trained


def test_a_learning_rate_of_zero_is_a_config_error(cli, llama, data, tmp_path):
    result = cli(*_flags(llama, data, tmp_path / "run", 0))
    assert result.code == 2
    assert "train.learning_rate=0 must be above 0" in result.err
