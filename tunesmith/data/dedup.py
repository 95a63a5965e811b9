"""Exact and near-duplicate detection: between the rows of one source, and between splits.

Two rows are exact duplicates when their normalised text (case, spacing and punctuation
ignored) is the same, turn by turn. They are near-duplicates when both the prompt and the
response reach `threshold` Jaccard similarity over word trigrams. Asking both keeps templated
data apart ("Convert 5 March 2021" / "Convert 6 March 2021" share a prompt pattern but not an
answer), while the same answer to a reworded question is caught.

Candidates come from MinHash signatures with locality-sensitive hashing, per field: a row
is a candidate when it shares a band with the new row's prompt signature and another with its
response signature (the smaller of the two bucket sets is enumerated, the other checked), so
thousands of rows answering "yes" do not all become candidates of each other. Every candidate
is then confirmed with the exact Jaccard of the shingle sets, so a reported pair always meets
the threshold.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from tunesmith.data.formats import Example

PERMUTATIONS = 128
PRIME = (1 << 31) - 1  # hashes are taken mod this prime; a * h + b < 2^62 fits in uint64
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+")


def normalized(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def exact_key(example: Example) -> str:
    """Preference rows are the same row only with the same rejected answer (or label) too."""
    turns = [f"{m['role']}:{normalized(m['content'])}" for m in example.messages]
    if example.rejected is not None:
        turns.append(f"rejected:{normalized(example.rejected)}")
    if example.label is not None:
        turns.append(f"label:{example.label}")
    return "\x1f".join(turns)


def shingles(text: str) -> frozenset[str]:
    """Word trigrams of the normalised text; shorter texts are one shingle of all their words."""
    words = normalized(text).split()
    if len(words) < SHINGLE_WORDS:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i: i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))


def fields(example: Example) -> tuple[frozenset[str], frozenset[str]]:
    """(prompt shingles, response shingles): the prompt is every turn before the last answer."""
    prompt = "\n".join(m["content"] for m in example.messages[:-1])
    response = example.messages[-1]["content"]
    if example.rejected is not None:  # a pair repeats another only if both answers do
        response += "\n" + example.rejected
    return shingles(prompt), shingles(response)


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _bands_for(threshold: float) -> tuple[int, int]:
    """(bands, rows per band): the most selective banding under which a field at exactly
    `threshold` similarity still shares a band with probability >= 0.99 (1 - (1 - t^r)^b)."""
    options = [(PERMUTATIONS // r, r) for r in (32, 16, 8, 4, 2, 1)]
    for bands, rows in options:
        if 1 - (1 - threshold ** rows) ** bands >= 0.99:
            return bands, rows
    return options[-1]


class MinHasher:
    """PERMUTATIONS random hash functions h(x) = (a x + b) mod p with a, b uniform in [0, p): the
    minimum over a set's shingles agrees between two sets with probability = their Jaccard."""

    def __init__(self, seed: int = 1234):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, PERMUTATIONS, dtype=np.uint64)
        self.b = rng.integers(0, PRIME, PERMUTATIONS, dtype=np.uint64)
        self.hashes: dict[str, int] = {}  # shingle → hash; templated data repeats most shingles

    def _hash(self, shingle: str) -> int:
        value = self.hashes.get(shingle)
        if value is None:
            if len(self.hashes) > 2_000_000:
                self.hashes.clear()
            digest = hashlib.blake2b(shingle.encode(), digest_size=8).digest()
            value = self.hashes[shingle] = int.from_bytes(digest, "little") % PRIME
        return value

    def signature(self, items: frozenset[str]) -> np.ndarray:  # (PERMUTATIONS,) uint64
        if not items:
            return np.full(PERMUTATIONS, PRIME, dtype=np.uint64)  # above every hash: equal for all empties
        hashes = np.fromiter(map(self._hash, items), dtype=np.uint64, count=len(items))
        return ((self.a[:, None] * hashes[None, :] + self.b[:, None]) % PRIME).min(axis=1)


# (threshold, exact key) -> a row's shingles, signatures and band keys; the exact key holds every
# normalised word the shingles are made of, and every Index hashes with the same seed. Filled by
# deduplication, read by the leakage check, emptied after it (gather)
_NEAR_STATES: dict[tuple[float, str], tuple] = {}
MAX_REMEMBERED = 200_000


def forget_signatures() -> None:
    _NEAR_STATES.clear()


@dataclass
class Match:
    index: int  # the row that is a duplicate
    of: int  # the row it duplicates
    kind: str  # exact | near
    similarity: float


class Index:
    """Rows added one by one; `find` returns the first added row a new one duplicates."""

    def __init__(self, threshold: float | None, exact: bool = True):
        self.threshold = threshold
        self.exact = exact
        self.keys: dict[str, int] = {}
        self.hasher = MinHasher()
        self.bands, self.rows = _bands_for(threshold) if threshold else (0, 0)
        # per field (0: prompt, 1: response): band → band key → rows
        self.buckets: tuple[list[dict[bytes, list[int]]], ...] = ([{} for _ in range(self.bands)],
                                                                    [{} for _ in range(self.bands)])
        self.shingles: dict[int, tuple[frozenset, frozenset]] = {}
        self.signatures = np.zeros((64, 2, PERMUTATIONS), dtype=np.uint64)  # (capacity, field, permutation)

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        return [signature[i * self.rows: (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def _candidates(self, keys: tuple[list[bytes], list[bytes]], signatures: np.ndarray) -> list[int]:
        """Rows sharing a band of the field with fewer bucket members whose signatures estimate
        both similarities near the threshold or above (0.25 below it is over six standard
        deviations of the estimate: no true duplicate is lost there)."""
        sizes = [sum(len(self.buckets[f][band].get(k, ())) for band, k in enumerate(keys[f])) for f in (0, 1)]
        walk = 0 if sizes[0] <= sizes[1] else 1
        found: set[int] = set()
        for band, k in enumerate(keys[walk]):
            found.update(self.buckets[walk][band].get(k, ()))
        if not found:
            return []
        rows = np.fromiter(found, dtype=np.int64, count=len(found))
        estimate = (self.signatures[rows] == signatures[None]).mean(axis=2).min(axis=1)  # (n_found,)
        return sorted(rows[estimate >= self.threshold - 0.25].tolist())

    def state(self, example: Example, key: str | None = None) -> tuple:
        """What `add` records of a row: its exact key, and with a threshold its shingles, signatures
        and band keys (a pure function of the key and the threshold, remembered for the leakage
        check, which meets every row deduplication has already seen)."""
        key = exact_key(example) if key is None else key
        if not self.threshold:
            return key, None
        known = _NEAR_STATES.get((self.threshold, key))
        if known is not None:
            return key, known
        prompt, response = fields(example)
        signatures = np.stack([self.hasher.signature(prompt), self.hasher.signature(response)])  # (2, perms)
        keys = (self._band_keys(signatures[0]), self._band_keys(signatures[1]))
        if len(_NEAR_STATES) >= MAX_REMEMBERED:
            _NEAR_STATES.clear()
        _NEAR_STATES[(self.threshold, key)] = near = (prompt, response, signatures, keys)
        return key, near

    def find(self, example: Example) -> tuple[Match | None, tuple]:
        """(match or None, state to pass to add)."""
        key = exact_key(example)
        if self.exact and key in self.keys:
            return Match(-1, self.keys[key], "exact", 1.0), (key, None)
        state = self.state(example, key)
        if state[1] is None:
            return None, state
        prompt, response, signatures, keys = state[1]
        for j in self._candidates(keys, signatures):
            other_prompt, other_response = self.shingles[j]
            similarity = min(jaccard(prompt, other_prompt), jaccard(response, other_response))
            if similarity >= self.threshold:
                return Match(-1, j, "near", similarity), state
        return None, state

    def add(self, index: int, state: tuple) -> None:
        key, near = state
        self.keys.setdefault(key, index)
        if near is None:
            return
        prompt, response, signatures, keys = near
        self.shingles[index] = (prompt, response)
        if index >= len(self.signatures):
            grown = np.zeros((max(2 * len(self.signatures), index + 1), 2, PERMUTATIONS), dtype=np.uint64)
            grown[: len(self.signatures)] = self.signatures
            self.signatures = grown
        self.signatures[index] = signatures
        for field_number in (0, 1):
            for band, k in enumerate(keys[field_number]):
                self.buckets[field_number][band].setdefault(k, []).append(index)


def deduplicate(examples: list[Example], exact: bool, threshold: float | None
                ) -> tuple[list[Example], list[Match]]:
    """Keep the first of every group of duplicates; the matches name what each removed row repeats."""
    if not exact and not threshold:
        return list(examples), []
    index, kept, removed = Index(threshold, exact), [], []
    for i, example in enumerate(examples):
        match, state = index.find(example)
        if match is not None:
            match.index = i
            removed.append(match)
            continue
        index.add(i, state)
        kept.append(example)
    return kept, removed


def reference_index(reference: list[Example], threshold: float | None) -> Index:
    """The rows other rows are checked against (the leakage check's train split), built once."""
    index = Index(threshold, exact=True)
    for i, example in enumerate(reference):
        index.add(i, index.state(example))
    return index


def overlaps(index: Index, queries: list[Example]) -> list[Match]:
    """Rows of `queries` that exactly or nearly duplicate a row of the index's reference rows."""
    if not index.keys or not queries:
        return []
    matches = []
    for i, example in enumerate(queries):
        match, _ = index.find(example)
        if match is not None:
            match.index = i
            matches.append(match)
    return matches
