"""Optimizer and learning-rate schedule, by their common names."""

from __future__ import annotations

import math

import torch

from tunesmith.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not biases or norm scales); fused where available."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=train.learning_rate, betas=train.betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused kernels need support for every param's device/dtype
        return torch.optim.AdamW(groups, lr=train.learning_rate, betas=train.betas, foreach=True)


def lr_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    peak = train.learning_rate
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return peak
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = peak * train.min_lr_ratio
    if train.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
