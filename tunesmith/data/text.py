"""Continued pre-training on unlabeled text (data.format: text).

Each document is tokenized (with the tokenizer's own leading tokens, e.g. BOS, where it adds
them) and ends with EOS; the documents of a split are concatenated in order and cut into blocks
of max_seq_length tokens. Every token is a training target. A block is one example of the
TokenizedSplit, so training, packing and validation treat it like any other example; within a
block, a document may attend to the end of the previous one, as in ordinary pre-training.
"""

from __future__ import annotations

from bisect import bisect_right

from tunesmith.data.dataset import TokenizedSplit
from tunesmith.data.formats import Example
from tunesmith.data.templates import Encoder


def document_ids(encoder: Encoder, tokenizer, text: str) -> list[int]:
    eos = tokenizer.eos_token_id
    return encoder.encode_prompt(text) + ([eos] if eos is not None else [])


def within_length_limits(length: int, min_tokens: int, max_tokens: int | None, stats: dict) -> bool:
    """data.min_tokens / data.max_tokens: False (and counted as too_short / too_long) outside them."""
    if length < min_tokens:
        stats["too_short"] += 1
        return False
    if max_tokens is not None and length > max_tokens:
        stats["too_long"] += 1
        return False
    return True


def pack_documents(documents: list[Example], encoder: Encoder, tokenizer, block_size: int,
                   min_tokens: int = 0, max_tokens: int | None = None
                   ) -> tuple[TokenizedSplit, list[dict], dict]:
    """(blocks, one row per block naming its documents, counts)."""
    stats = {"rows": len(documents), "documents": 0, "examples": 0, "truncated": 0, "dropped_no_response": 0,
             "too_short": 0, "too_long": 0, "tokens": 0, "supervised_tokens": 0}
    stream: list[int] = []
    owners: list[tuple[int, str]] = []  # (start position in the stream, document where)
    for document in documents:
        ids = document_ids(encoder, tokenizer, document.reference)
        if not within_length_limits(len(ids), min_tokens, max_tokens, stats):
            continue
        owners.append((len(stream), document.where))
        stream += ids
        stats["documents"] += 1
    blocks = [stream[i: i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]  # one token predicts nothing
    starts = [begin for begin, _ in owners]
    rows = [{"where": _owners_of(owners, starts, i * block_size, i * block_size + len(b)), "prompt": "",
             "messages": [], "reference": "", "extra": {}} for i, b in enumerate(blocks)]
    stats["examples"] = len(blocks)
    stats["tokens"] = stats["supervised_tokens"] = sum(len(b) for b in blocks)
    split = TokenizedSplit.from_lists(blocks, [[True] * len(b) for b in blocks])
    return split, rows, stats


def _owners_of(owners: list[tuple[int, str]], starts: list[int], start: int, end: int) -> str:
    """The documents whose tokens fall in [start, end), for the row's `where`."""
    first = max(bisect_right(starts, start) - 1, 0)
    names = []
    for begin, where in owners[first:]:
        if begin >= end:
            break
        names.append(where)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
