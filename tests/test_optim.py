"""Optimizers by name (each lowers the loss; paged ones fall back on CPU with a message) and the
learning-rate schedules against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.config import TrainConfig
from tunesmith.train.loop import train_step
from tunesmith.train.optim import build_optimizer, effective_optimizer, lr_at, restart_position

NO_AUTOCAST = torch.autocast("cpu", dtype=torch.float32, enabled=False)


def train_config(**values) -> TrainConfig:
    return TrainConfig(**{"learning_rate": 1e-3, "min_lr_ratio": 0.1, **values})


@pytest.mark.parametrize("name, kind, lr", [
    ("adamw", torch.optim.AdamW, 1e-2),
    ("sgd", torch.optim.SGD, 0.5),
    ("adafactor", "Adafactor", 1e-2),
    ("adamw_8bit", None, 1e-2),
])
def test_each_optimizer_lowers_the_loss(llama, name, kind, lr):
    from test_methods import build, losses_over_steps

    model, _ = build(llama, "lora")
    train = TrainConfig(learning_rate=lr, optimizer=name)
    optimizer = build_optimizer(model, train)
    if isinstance(kind, str):
        assert type(optimizer).__name__ == kind
    elif kind is not None:
        assert type(optimizer) is kind
    else:
        import bitsandbytes as bnb

        assert isinstance(optimizer, bnb.optim.AdamW8bit)
    losses = losses_over_steps(model, train)
    assert losses[-1] < losses[0] - 0.05, losses


def test_sgd_momentum_and_weight_decay_groups(llama):
    from test_methods import build

    model, _ = build(llama, "lora")
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.8, weight_decay=0.1))
    assert [g["momentum"] for g in optimizer.param_groups] == [0.8]
    assert optimizer.param_groups[0]["weight_decay"] == 0.1  # LoRA weights are all matrices


def test_adamw_8bit_keeps_8_bit_state(llama):
    from test_methods import build, fixed_batch

    model, _ = build(llama, "lora", lora={"r": 64, "dropout": 0.0})  # A is 64 x 64 = 4096 values: 8-bit
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-3, optimizer="adamw_8bit"))
    train_step(model, [fixed_batch(model.config.vocab_size)], NO_AUTOCAST, 64)
    optimizer.step()
    big = [s for s in optimizer.state.values() if s["state1"].numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)


def test_paged_optimizers_fall_back_on_cpu_and_say_so(capsys):
    assert effective_optimizer("paged_adamw_8bit", torch.device("cpu")) == "adamw_8bit"
    assert effective_optimizer("paged_adamw_32bit", torch.device("cpu")) == "adamw"
    captured = capsys.readouterr()  # once: a second call would only see what came after the first
    assert captured.err.count("paged optimizers need CUDA") == 2 and captured.out == ""  # one line per fallback
    assert effective_optimizer("paged_adamw_8bit", torch.device("cuda")) == "paged_adamw_8bit"
    optimizer = build_optimizer(torch.nn.Linear(4, 4), TrainConfig(optimizer="paged_adamw_32bit"))
    assert type(optimizer) is torch.optim.AdamW


def test_step_decay_follows_its_formula():
    train = train_config(lr_schedule="step", warmup_steps=2, lr_step_size=3, lr_gamma=0.5, min_lr_ratio=0.0)
    rates = [lr_at(s, 20, train) for s in range(12)]
    expected = [1e-3 * 1 / 2, 1e-3] + [1e-3 * 0.5 ** ((s - 2) // 3) for s in range(2, 12)]
    assert rates == pytest.approx(expected)
    assert rates[2:5] == pytest.approx([1e-3] * 3) and rates[5] == pytest.approx(5e-4)
    floored = train_config(lr_schedule="step", warmup_steps=0, lr_step_size=1, lr_gamma=0.5, min_lr_ratio=0.2)
    assert lr_at(10, 20, floored) == pytest.approx(2e-4)  # never below min_lr_ratio x peak


def test_exponential_decay_follows_its_formula():
    train = train_config(lr_schedule="exponential", warmup_steps=0, lr_gamma=0.9, min_lr_ratio=0.0)
    assert [lr_at(s, 50, train) for s in range(6)] == pytest.approx([1e-3 * 0.9**s for s in range(6)])
    # without a gamma the rate lands on the floor at the last step
    landing = train_config(lr_schedule="exponential", warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(4, 24, landing) == pytest.approx(1e-3)
    assert lr_at(24, 24, landing) == pytest.approx(1e-4)
    assert lr_at(14, 24, landing) == pytest.approx(1e-3 * 0.1**0.5)


def test_cosine_with_warm_restarts_follows_its_formula():
    train = train_config(lr_schedule="cosine_restarts", warmup_steps=0, restart_steps=4, restart_mult=2,
                         min_lr_ratio=0.0)
    # cycles of 4, 8, 16 steps; each starts again at the peak
    assert [restart_position(s, 4, 2) for s in (0, 3, 4, 11, 12)] == [(0, 4), (3, 4), (0, 8), (7, 8), (0, 16)]
    for step in range(28):
        position, length = restart_position(step, 4, 2)
        assert lr_at(step, 100, train) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * position / length)))
    assert lr_at(4, 100, train) == pytest.approx(1e-3) and lr_at(12, 100, train) == pytest.approx(1e-3)
    assert lr_at(2, 100, train) == pytest.approx(0.5e-3)  # half way through the first cycle
