"""Which examples each step sees, and how a micro batch becomes one packed row.

A micro batch is packed into a single row with no padding: examples are concatenated, position
ids restart at 0 for each, and attention stays inside each example (train/attention.py). Only
positions that predict a supervised token are gathered for the loss. Where every example of the
micro batch begins alike (a chat template's system block: 40% of the tokens of short rows), or
the two answers of a preference pair follow one prompt, that beginning is computed once and each
example attends to it: the same numbers, less work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.attention import ancestors

# Examples that begin with the same tokens (a chat template's system block; a preference pair's
# prompt) hold them once when there are at least this many: that beginning is a segment of its own,
# and each example's segment continues it (attends to it as if it were its own first tokens)
MIN_SHARED_PREFIX = 8
PREFIX_SHARE_DIVISOR = 8  # ... and at least an eighth of the examples' mean length


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T) all examples of the micro batch, end to end
    position_ids: torch.Tensor  # (1, T) restarting at 0 for each example (after a shared beginning: at its length)
    segments: list[tuple[int, int]]  # [start, end) of each example (and each shared beginning) within the row
    predict_at: torch.Tensor  # (n_targets,) positions whose next token is supervised
    targets: torch.Tensor  # (n_targets,) the supervised next tokens
    parents: tuple[int, ...] = ()  # per segment: the shared beginning it continues (its index), -1 for none;
    # a beginning may itself continue another (a pair's prompt after the system block all pairs share)

    @property
    def shares(self) -> bool:
        """Whether some segment continues a shared beginning (attention then needs the per-example loop)."""
        return any(parent >= 0 for parent in self.parents)

    @property
    def n_tokens(self) -> int:
        """Tokens of the examples (a shared beginning counted in each): the data's size."""
        lengths, context = [end - start for start, end in self.segments], self.context_lengths
        return sum(lengths[i] + context[i] for i in self.example_indices)

    @property
    def context_lengths(self) -> list[int]:
        """Per segment: the tokens of the shared beginnings it continues, all the way up."""
        return [sum(self.segments[a][1] - self.segments[a][0] for a in ancestors(self.parents, i))
                for i in range(len(self.segments))]

    @property
    def n_computed(self) -> int:
        """Tokens that go through the model."""
        return self.input_ids.shape[1]

    @property
    def n_targets(self) -> int:
        return self.targets.shape[0]

    @property
    def example_indices(self) -> list[int]:
        beginnings = set(self.parents)
        return [i for i in range(len(self.segments)) if i not in beginnings]

    @property
    def example_segments(self) -> list[tuple[int, int]]:
        """One [start, end) per example (without a shared beginning)."""
        return [self.segments[i] for i in self.example_indices]

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.segments,
                           self.predict_at.to(device), self.targets.to(device), self.parents)


def pack(split: TokenizedSplit, indices: list[int], share_prefix: bool = False) -> PackedBatch:
    return pack_sequences([split.example(index) for index in indices], share_prefix)


def shared_prefix_length(sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """How many first tokens all sequences have in common, up to the token before each one's
    first supervised token (that one's hidden state predicts a target); 0 below MIN_SHARED_PREFIX."""
    if len(sequences) < 2:
        return 0
    first_supervised = [int(sup.nonzero()[0]) if bool(sup.any()) else len(ids) for ids, sup in sequences]
    limit = min(first_supervised) - 1
    if limit < MIN_SHARED_PREFIX:
        return 0
    stacked = torch.stack([ids[:limit] for ids, _ in sequences])  # (n, limit)
    differs = (stacked != stacked[0]).any(0).nonzero()
    length = int(differs[0]) if len(differs) else limit
    mean_length = sum(len(ids) for ids, _ in sequences) / len(sequences)
    # the examples attend to it through an explicit mask, which makes their attention dearer than the
    # causal kernel's: worth it where the beginning is a real share of the work (short templated rows),
    # not for a system block in front of 2,000-token examples (measured: 0.7x the speed there)
    return length if length >= MIN_SHARED_PREFIX and length * PREFIX_SHARE_DIVISOR >= mean_length else 0


def pack_sequences(sequences: list[tuple[torch.Tensor, torch.Tensor]], share_prefix: bool = False) -> PackedBatch:
    """(ids, supervised) pairs end to end in one row; with share_prefix their common beginning once."""
    return pack_groups([sequences], share_prefix)


def pack_groups(groups: list[list[tuple[torch.Tensor, torch.Tensor]]], share_prefix: bool = False) -> PackedBatch:
    """Each group's (ids, supervised) sequences end to end in one row, group after group. With
    share_prefix, what all sequences begin with is held once (a system block), and after it what
    each group's sequences begin with (a preference pair's prompt)."""
    row = _Row()
    common = shared_prefix_length([s for group in groups for s in group]) if share_prefix else 0
    root = row.add(groups[0][0][0][:common], 0, -1) if common else -1
    for group in groups:
        rest = [(ids[common:], supervised[common:]) for ids, supervised in group]
        own = shared_prefix_length(rest) if share_prefix and len(groups) > 1 else 0
        beginning = row.add(rest[0][0][:own], common, root) if own else root
        for example_ids, supervised in rest:
            row.add(example_ids[own:], common + own, beginning, supervised[own:])
    return row.batch()


class _Row:
    """A packed row as it is built: segment after segment, each with its parent and first position."""

    def __init__(self):
        self.ids, self.positions, self.segments, self.parents, self.predict_at, self.targets = [], [], [], [], [], []
        self.cursor = 0

    def add(self, ids: torch.Tensor, first_position: int, parent: int, supervised: torch.Tensor | None = None) -> int:
        """Append a segment (an example where `supervised` is given); returns its index."""
        length = ids.shape[0]
        self.ids.append(ids)
        self.positions.append(torch.arange(first_position, first_position + length))
        self.segments.append((self.cursor, self.cursor + length))
        self.parents.append(parent)
        if supervised is not None:
            where = supervised[1:].nonzero().squeeze(1)  # (k,) targets at where + 1
            self.predict_at.append(where + self.cursor)
            self.targets.append(ids[1:][where])
        self.cursor += length
        return len(self.segments) - 1

    def batch(self) -> PackedBatch:
        parents = tuple(self.parents) if any(p >= 0 for p in self.parents) else ()
        return PackedBatch(torch.cat(self.ids)[None], torch.cat(self.positions)[None], self.segments,
                           torch.cat(self.predict_at), torch.cat(self.targets), parents)


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
