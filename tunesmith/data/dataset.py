"""A tokenized split on disk: flat token arrays in safetensors (no pickle) plus row metadata.

    tokens.safetensors   input_ids (n_tokens,) int32, supervised (n_tokens,) uint8,
                         offsets (n_examples + 1,) int64: example i is [offsets[i], offsets[i+1])
                         labels (n_examples,) int8, preference data only: 1 chosen / desirable, 0 not
    rows.jsonl           per example: prompt messages, reference answer, source file:line
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class TokenizedSplit:
    input_ids: torch.Tensor  # (n_tokens,) int32
    supervised: torch.Tensor  # (n_tokens,) bool: True where the token is a training target
    offsets: torch.Tensor  # (n_examples + 1,) int64
    labels: torch.Tensor | None = None  # (n_examples,) int8 for preference data: 1 chosen/desirable, 0 not

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.input_ids[start:end].long(), self.supervised[start:end]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def target_counts(self) -> torch.Tensor:
        """Supervised targets per example: supervised tokens after the first (nothing predicts it)."""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.long)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.long), self.supervised.long().cumsum(0)])
        counts = cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]
        return counts - self.supervised[self.offsets[:-1]].long()

    @classmethod
    def from_lists(cls, ids: list[list[int]], supervised: list[list[bool]],
                   labels: list[bool] | None = None) -> "TokenizedSplit":
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        flat_ids = torch.tensor([t for row in ids for t in row], dtype=torch.int32)
        flat_sup = torch.tensor([s for row in supervised for s in row], dtype=torch.bool)
        label_tensor = torch.tensor(labels, dtype=torch.int8) if labels is not None else None
        return cls(flat_ids, flat_sup, offsets, label_tensor)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"input_ids": self.input_ids.contiguous(), "supervised": self.supervised.to(torch.uint8),
                   "offsets": self.offsets}
        if self.labels is not None:
            tensors["labels"] = self.labels
        save_file(tensors, str(folder / "tokens.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> "TokenizedSplit":
        tensors = load_file(str(folder / "tokens.safetensors"))
        return cls(tensors["input_ids"], tensors["supervised"].bool(), tensors["offsets"], tensors.get("labels"))


def write_rows(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "rows.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_rows(folder: Path) -> list[dict]:
    path = folder / "rows.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
