"""Which examples each step sees, and how a micro batch becomes one packed row.

A micro batch is packed into a single row with no padding: examples are concatenated, position
ids restart at 0 for each, and attention stays inside each example (train/attention.py). Only
positions that predict a supervised token are gathered for the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunesmith.data.dataset import TokenizedSplit


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T) all examples of the micro batch, end to end
    position_ids: torch.Tensor  # (1, T) restarting at 0 for each example
    segments: list[tuple[int, int]]  # [start, end) of each example within the row
    predict_at: torch.Tensor  # (n_targets,) positions whose next token is supervised
    targets: torch.Tensor  # (n_targets,) the supervised next tokens

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_targets(self) -> int:
        return self.targets.shape[0]

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.segments,
                           self.predict_at.to(device), self.targets.to(device))


def pack(split: TokenizedSplit, indices: list[int]) -> PackedBatch:
    return pack_sequences([split.example(index) for index in indices])


def pack_sequences(sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> PackedBatch:
    """(ids, supervised) pairs end to end in one row."""
    ids, positions, segments, predict_at, targets = [], [], [], [], []
    cursor = 0
    for example_ids, supervised in sequences:
        length = example_ids.shape[0]
        ids.append(example_ids)
        positions.append(torch.arange(length))
        segments.append((cursor, cursor + length))
        where = supervised[1:].nonzero().squeeze(1)  # (k,) targets at where + 1
        predict_at.append(where + cursor)
        targets.append(example_ids[1:][where])
        cursor += length
    return PackedBatch(torch.cat(ids)[None], torch.cat(positions)[None], segments,
                       torch.cat(predict_at), torch.cat(targets))


@dataclass(frozen=True)
class StepPlan:
    """A seeded stream of example indices: epoch e is a fixed permutation of the split, and step s
    takes the next batch_size of them (crossing epoch boundaries), so any step is reproducible."""

    n_examples: int
    batch_size: int
    micro_batch_size: int
    total_steps: int
    seed: int

    @classmethod
    def build(cls, n_examples: int, batch_size: int, micro_batch_size: int, epochs: float,
              max_steps: int | None, seed: int) -> "StepPlan":
        total = max_steps or max(1, math.ceil(epochs * n_examples / batch_size))
        return cls(n_examples, batch_size, micro_batch_size, total, seed)

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n_examples, generator=generator).tolist()

    def step_indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        out, epoch_cache = [], {}
        for k in range(start, start + self.batch_size):
            epoch, position = divmod(k, self.n_examples)
            if epoch not in epoch_cache:
                epoch_cache[epoch] = self._order(epoch)
            out.append(epoch_cache[epoch][position])
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        indices = self.step_indices(step)
        size = self.micro_batch_size
        return [indices[i: i + size] for i in range(0, len(indices), size)]

    def epoch_at(self, step: int) -> float:
        return step * self.batch_size / self.n_examples
