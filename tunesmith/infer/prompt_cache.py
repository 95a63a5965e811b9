"""Keys and values of what the engine has read, kept so that a prompt beginning the same way is not
read again (prompt caching, as llama.cpp's server keeps each slot's last prompt and vLLM its
prefix blocks).

Where it pays:
- a chat client sends the whole conversation every turn, so each prompt begins with the previous
  prompt and its answer: only the new message is read;
- a server's clients send the same system block, or the same question again;
- evaluate's prompts share their template's beginning (learned by the engine when they arrive
  together, and kept here as an entry of its own).

An entry is the token ids a request's row held in the cache when it finished (its prompt and the
answer tokens fed back) with their keys and values, one row, per layer, for one adapter (another
adapter computes other keys and values). `find` gives the entry that shares the longest beginning
with a prompt; the engine copies that many columns into the newcomer's cache and reads the prompt
from there. Entries are kept most recently used last, within `max_bytes`: the oldest go first. An
entry whose ids begin another one's is dropped (the longer one serves every prompt it served).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# A match shorter than this is not used: copying its columns and the hole it leaves in the
# newcomer's mask cost about what reading them costs
MIN_MATCH = 16


@dataclass(eq=False)  # entries are compared by identity
class Entry:
    adapter: str | None
    ids: torch.Tensor  # (tokens,) long, on the CPU
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (1, kv_heads, tokens, head_dim) per layer

    @property
    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self.layers)

    @property
    def key(self) -> tuple:
        return self.adapter, tuple(self.ids[:MIN_MATCH].tolist())


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recently used first
        self.by_start: dict[tuple, list[Entry]] = {}  # (adapter, first MIN_MATCH ids) -> entries
        self.bytes = 0
        self.hits = 0  # prompts that found a match, and the tokens they did not read again
        self.tokens_reused = 0

    def find(self, adapter: str | None, prompt: list[int]) -> tuple[Entry, int] | None:
        """The entry sharing the longest beginning with `prompt`, and that length: at least MIN_MATCH
        and at most all but the prompt's last token (whose logits give the first answer token)."""
        if len(prompt) <= MIN_MATCH:
            return None
        candidates = self.by_start.get((adapter, tuple(prompt[:MIN_MATCH])), [])
        if not candidates:
            return None
        ids = torch.tensor(prompt[:-1])
        best, length = None, 0
        for entry in candidates:
            shared = _shared_length(entry.ids, ids)
            if shared > length:
                best, length = entry, shared
        if best is None or length < MIN_MATCH:
            return None
        self.entries.move_to_end(id(best))
        return best, length

    def note_hit(self, length: int) -> None:
        self.hits += 1
        self.tokens_reused += length

    def add(self, adapter: str | None, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep these ids' keys and values (one row per layer, owned by the cache from now on)."""
        if len(ids) < MIN_MATCH:
            return
        entry = Entry(adapter, torch.tensor(ids), layers)
        if entry.nbytes > self.max_bytes:
            return
        for other in list(self.by_start.get(entry.key, [])):
            shorter, longer = sorted((other.ids, entry.ids), key=len)
            if _shared_length(shorter, longer) == len(shorter):  # one begins the other
                if len(other.ids) >= len(entry.ids):
                    self.entries.move_to_end(id(other))
                    return
                self._drop(other)
        self.by_start.setdefault(entry.key, []).append(entry)
        self.entries[id(entry)] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries.values())))

    def _drop(self, entry: Entry) -> None:
        del self.entries[id(entry)]
        self.by_start[entry.key].remove(entry)
        if not self.by_start[entry.key]:
            del self.by_start[entry.key]
        self.bytes -= entry.nbytes


def _shared_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids two 1-D tensors share."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return n if len(differ) == 0 else int(differ[0])
