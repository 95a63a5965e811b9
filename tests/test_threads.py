"""train.threads / --threads, and the warning when the CPU is already busy (issue 17, item 11)."""

from __future__ import annotations

import os

import torch
from helpers import fast_train_flags, qa_rows, write_jsonl

from tunesmith.device import use_threads


def test_a_busy_cpu_is_reported_with_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    try:
        assert use_threads(1, "cpu") == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "the CPU is busy (load average 7.5 on 2 cores)" in err and "train.threads / --threads" in err


def test_an_idle_cpu_gets_no_warning(monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    use_threads(None, "cpu")
    assert capsys.readouterr().err == ""


def test_finetune_uses_the_threads_it_is_given(cli, llama, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(24))
    before = torch.get_num_threads()
    try:
        result = cli("finetune", "--model", llama, "--data.path", data, "--out_dir", tmp_path / "run",
                     "--train.threads", 2, *fast_train_flags())
        assert result.code == 0, result.err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_zero_threads_is_a_config_error(cli, llama, tmp_path):
    result = cli("finetune", "--model", llama, "--data.path", tmp_path / "none.jsonl", "--train.threads", 0)
    assert result.code == 2 and "train.threads=0" in result.err
