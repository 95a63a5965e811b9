"""What one optimizer step minimises, behind one small interface the loop calls.

    units(split)          what the step plan counts: examples (supervised), pairs, KTO answers
    batch(split, ids)     one micro batch of those units, packed, on the device
    step(model, batches)  forward and backward over a step's micro batches → (mean loss, metrics)
    validate(model)       validation figures on a fixed subset: {"val_loss": ..., ...}

`Supervised` is next-token cross-entropy on the response tokens; the preference methods live
in train/preference.py. Every objective normalises over the whole step (all micro batches, all
ranks), so a step's gradient does not depend on how it is split.
"""

from __future__ import annotations

import torch

from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.batching import PackedBatch, pack
from tunesmith.train.distributed import Group, accumulating
from tunesmith.train.kernels import packed_attention
from tunesmith.train.loss import loss_sum, unwrap


def train_step(model, batches: list[PackedBatch], autocast, chunk_size: int,
               n_targets: torch.Tensor | int | None = None) -> torch.Tensor:
    """Forward and backward over one step's micro batches; returns the step's mean loss (a tensor).
    n_targets: supervised tokens of the whole step (across all ranks); default: these batches'."""
    if n_targets is None:
        n_targets = sum(batch.n_targets for batch in batches)
    step_loss = torch.zeros((), device=batches[0].input_ids.device)
    for i, batch in enumerate(batches):
        # backward too inside packed_attention: checkpointed layers recompute inside it
        with accumulating(model, i < len(batches) - 1), packed_attention(unwrap(model)):
            with autocast:
                summed = loss_sum(model, batch, chunk_size)
            (summed / n_targets).backward()
        step_loss += summed.detach() / n_targets
    return step_loss


@torch.no_grad()
def validation_loss(model, split: TokenizedSplit, micro_batch_size: int, eval_iters: int, chunk_size: int,
                    autocast, device, share_prefix: bool = False) -> float | None:
    """Mean loss per supervised token over the first eval_iters micro batches (a fixed subset)."""
    if len(split) == 0:
        return None
    model.eval()
    total, targets = 0.0, 0
    for start in range(0, min(len(split), micro_batch_size * eval_iters), micro_batch_size):
        batch = pack(split, list(range(start, min(start + micro_batch_size, len(split)))), share_prefix).to(device)
        with autocast, packed_attention(unwrap(model)):
            total += float(loss_sum(model, batch, chunk_size))
        targets += batch.n_targets
    model.train()
    return total / max(targets, 1)


class Supervised:
    """Cross-entropy per supervised token, summed over the step and divided by its token count."""

    def __init__(self, splits: dict[str, TokenizedSplit], train_cfg, device, autocast, group: Group = Group(),
                 share_prefix: bool = False):
        self.splits, self.train_cfg, self.device, self.autocast, self.group = splits, train_cfg, device, autocast, group
        self.share_prefix = share_prefix  # a micro batch's common beginning computed once (train/batching.py)

    def units(self, split: str) -> int:
        return len(self.splits[split])

    def batch(self, split: str, indices: list[int]) -> PackedBatch:
        return pack(self.splits[split], indices, self.share_prefix).to(self.device)

    def step(self, model, batches: list[PackedBatch]) -> tuple[torch.Tensor, dict]:
        step_targets = self.group.sum(torch.tensor(sum(b.n_targets for b in batches), device=self.device))
        loss = train_step(model, batches, self.autocast, self.train_cfg.loss_chunk_size, step_targets)
        return self.group.sum(loss), {}

    def validate(self, model) -> dict:
        cfg = self.train_cfg
        value = validation_loss(model, self.splits["val"], cfg.micro_batch_size, cfg.eval_iters,
                                cfg.loss_chunk_size, self.autocast, self.device, self.share_prefix)
        return {} if value is None else {"val_loss": value}
