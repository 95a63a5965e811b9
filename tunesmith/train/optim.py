"""Optimizer and learning-rate schedule, by their common names."""

from __future__ import annotations

import math

import torch

from tunesmith.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer by name; weight decay only on matrices (not biases or norm scales)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    device = (decay or no_decay)[0].device
    name = effective_optimizer(train.optimizer, device)
    if name == "adamw":
        try:
            return torch.optim.AdamW(groups, lr=train.learning_rate, betas=train.betas, fused=True)
        except (RuntimeError, TypeError, ValueError):  # fused kernels need support for every param's device/dtype
            return torch.optim.AdamW(groups, lr=train.learning_rate, betas=train.betas, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train.learning_rate, momentum=train.momentum, foreach=True)
    if name == "adafactor":
        # no first moment, a factored second moment (a row and a column vector per matrix); the
        # fine-tuning setting: steps of learning_rate, not relative to each weight's size (which
        # would barely move LoRA's zero-initialised B)
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=train.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    return _bitsandbytes_optimizer(name, groups, train)


# Paging moves optimizer state between GPU and host memory through CUDA unified memory; without
# CUDA there is nothing to page, so these names fall back to their unpaged twins.
UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw"}


def effective_optimizer(name: str, device: torch.device) -> str:
    """The optimizer that really runs on `device` (paged ones need CUDA), said out loud once."""
    if name in UNPAGED and device.type != "cuda":
        from tunesmith.log import say

        say(f"train.optimizer={name}: paged optimizers need CUDA (unified memory); on {device.type} "
            f"using {UNPAGED[name]} instead, which keeps the same state in ordinary memory")
        return UNPAGED[name]
    return name


def _bitsandbytes_optimizer(name: str, groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    from tunesmith.model.quantize import require_bitsandbytes

    bnb = require_bitsandbytes(f"train.optimizer={name}")
    kinds = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
             "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return kinds[name](groups, lr=train.learning_rate, betas=train.betas)


def lr_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    peak = train.learning_rate
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return peak
    after_warmup = step - train.warmup_steps
    decay_steps = max(1, total_steps - train.warmup_steps)
    floor = peak * train.min_lr_ratio
    if train.lr_schedule == "step":  # x gamma every lr_step_size steps, never below the floor
        gamma = 0.5 if train.lr_gamma is None else train.lr_gamma
        return max(floor, peak * gamma ** (after_warmup // train.lr_step_size))
    if train.lr_schedule == "exponential":  # x gamma every step; default gamma lands on the floor
        gamma = train.lr_gamma
        if gamma is None:
            gamma = train.min_lr_ratio ** (1.0 / decay_steps) if train.min_lr_ratio > 0 else 0.0
        return max(floor, peak * gamma ** min(after_warmup, decay_steps))
    if train.lr_schedule == "cosine_restarts":
        position, length = restart_position(after_warmup, train.restart_steps, train.restart_mult)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * position / length))
    progress = min(1.0, after_warmup / decay_steps)
    if train.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def restart_position(steps: int, first_cycle: int, mult: int) -> tuple[int, int]:
    """(steps into the current cycle, that cycle's length) for cycles first_cycle, x mult, x mult^2..."""
    length = first_cycle
    while steps >= length:
        steps -= length
        length *= mult
    return steps, length
