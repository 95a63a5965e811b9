"""The matmul peak behind MFU, and precision auto on a CPU (issue 20, items 3 and 5)."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith import device
from tunesmith.train import flops

CPU = torch.device("cpu")
MATMUL_FLOPS = 2 * 2048**3  # one 2048 x 2048 product, the size measure_peak_flops uses on a CPU


class SlowStart:
    """A clock that only matmuls move: the first `slow` products take 1 s each, the rest 0.1 s (a CPU
    still ramping up, or another process finishing, while the measurement starts)."""

    def __init__(self, slow: int):
        self.now, self.calls, self.slow = 0.0, 0, slow

    def perf_counter(self) -> float:
        return self.now

    def matmul(self, a, b):
        self.calls += 1
        self.now += 1.0 if self.calls <= self.slow else 0.1
        return a


@pytest.fixture
def slow_start(monkeypatch):
    clock = SlowStart(slow=3)  # the 2 warm-up products and the first window (a 1 s product fills it)
    monkeypatch.setattr(flops.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: clock.matmul(a, b))
    return clock


def test_the_peak_is_the_best_window_not_a_slow_start(slow_start):
    peak = flops.measure_peak_flops(CPU, torch.float32, seconds=1.0, windows=5)
    assert peak == pytest.approx(MATMUL_FLOPS / 0.1, rel=1e-6)


def test_one_window_would_keep_the_slow_start(slow_start):
    peak = flops.measure_peak_flops(CPU, torch.float32, seconds=1.0, windows=1)
    assert peak < MATMUL_FLOPS / 0.5  # what the single-window measurement of before reported


def seed_peaks(cache, fp32: float, bf16: float) -> None:
    key = f"cpu-{torch.get_num_threads()}"
    (cache / flops.PEAK_FILE).write_text(json.dumps({f"{key}/torch.float32": fp32, f"{key}/torch.bfloat16": bf16}))


@pytest.mark.parametrize(("bf16", "picked"), [(3e11, torch.bfloat16), (0.5e11, torch.float32),
                                             (1.05e11, torch.float32)])
def test_precision_auto_takes_bf16_only_where_it_measures_faster(monkeypatch, tmp_path, bf16, picked):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    seed_peaks(tmp_path, fp32=1e11, bf16=bf16)
    assert device.pick_dtype("auto", CPU) == picked
    assert device.pick_dtype("fp32", CPU) == torch.float32


def test_without_bf16_instructions_nothing_is_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.pick_dtype("auto", CPU) == torch.float32
    assert not (tmp_path / flops.PEAK_FILE).exists()


def test_asking_for_bf16_where_it_is_slower_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    seed_peaks(tmp_path, fp32=3e11, bf16=1.5e11)
    assert device.pick_dtype("bf16", CPU) == torch.bfloat16
    assert "bf16 matmul measures slower than fp32" in capsys.readouterr().err
