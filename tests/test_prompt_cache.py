"""The prompt cache on its own: longest match, its limits, eviction within the budget, entries that
another one makes redundant, adapters kept apart."""

from __future__ import annotations

import torch

from tunesmith.infer.prompt_cache import MIN_MATCH, PromptCache


def _layers(tokens: int, fill: float = 0.0, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of `tokens` columns: (1, 2 heads, tokens, 4) per layer, 64 bytes a column each."""
    return [(torch.full((1, 2, tokens, 4), fill), torch.full((1, 2, tokens, 4), fill)) for _ in range(layers)]


BYTES_PER_TOKEN = 2 * 2 * 2 * 4 * 4  # layers x (keys, values) x heads x head_dim x fp32
SYSTEM = list(range(100, 100 + MIN_MATCH + 4))  # a beginning long enough to be matched


def test_the_longest_match_is_found_and_never_covers_the_last_prompt_token():
    cache = PromptCache(1 << 20)
    short, long = SYSTEM + [1, 2], SYSTEM + [1, 2, 3, 4, 5]
    cache.add(None, short + [9], _layers(len(short) + 1, 1.0))
    cache.add(None, long, _layers(len(long), 2.0))
    entry, length = cache.find(None, long + [6, 7])
    assert length == len(long) and float(entry.layers[0][0][0, 0, 0, 0]) == 2.0
    entry, length = cache.find(None, SYSTEM + [1, 2, 9, 8])  # the shorter entry shares more here
    assert length == len(short) + 1 and float(entry.layers[0][0][0, 0, 0, 0]) == 1.0
    assert cache.find(None, long)[1] == len(long) - 1  # the same prompt again: its last token is read again
    assert cache.find(None, SYSTEM[:MIN_MATCH - 1] + [0] * 10) is None  # under MIN_MATCH shared: no match
    assert cache.find(None, [7] + SYSTEM) is None  # begins otherwise


def test_an_entry_that_begins_another_is_dropped_and_a_shorter_one_not_kept():
    cache = PromptCache(1 << 20)
    cache.add(None, SYSTEM, _layers(len(SYSTEM)))
    cache.add(None, SYSTEM + [1, 2, 3], _layers(len(SYSTEM) + 3))  # the learned beginning, then a whole prompt
    assert [len(e.ids) for e in cache.entries.values()] == [len(SYSTEM) + 3]
    cache.add(None, SYSTEM + [1], _layers(len(SYSTEM) + 1))  # already covered
    assert [len(e.ids) for e in cache.entries.values()] == [len(SYSTEM) + 3]
    assert cache.bytes == (len(SYSTEM) + 3) * BYTES_PER_TOKEN


def test_the_least_recently_used_entries_go_first_when_the_budget_is_full():
    tokens = len(SYSTEM) + 1
    cache = PromptCache(3 * tokens * BYTES_PER_TOKEN)
    for last in (1, 2, 3):
        cache.add(None, SYSTEM + [last], _layers(tokens))
    assert cache.find(None, SYSTEM + [1, 0])[1] == tokens  # entry 1 used: now the newest
    cache.add(None, SYSTEM + [4], _layers(tokens))  # over the budget: entry 2 (the oldest unused) goes
    kept = sorted(int(e.ids[-1]) for e in cache.entries.values())
    assert kept == [1, 3, 4] and cache.bytes == 3 * tokens * BYTES_PER_TOKEN
    cache.add(None, SYSTEM * 4, _layers(len(SYSTEM) * 4))  # larger than the whole budget: not kept
    assert len(cache.entries) == 3
    assert PromptCache(0).find(None, SYSTEM + [1]) is None


def test_adapters_do_not_share_entries():
    cache = PromptCache(1 << 20)
    cache.add("sql", SYSTEM + [1], _layers(len(SYSTEM) + 1))
    assert cache.find("dates", SYSTEM + [1, 2]) is None and cache.find(None, SYSTEM + [1, 2]) is None
    assert cache.find("sql", SYSTEM + [1, 2])[1] == len(SYSTEM) + 1
