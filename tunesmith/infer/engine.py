"""The one token loop behind `generate`, `evaluate`, `chat` and `serve`: continuous batching.

transformers' `generate` applies one set of sampling settings to a whole batch and keeps a row
until the longest answer ends. Here every request brings its own settings, joins the running batch
between two decode steps, and leaves it the moment it is finished:

    admit     a request waits with its sampler (transformers' logits processors, its own seeded
              generator), its stop tokens, its adapter
    reuse     the longest beginning of its prompt that a finished row held (a chat's previous turn,
              the same system block or question again; prompt_cache.py) is copied into its cache
              and not read again; newcomers that arrive together read their common beginning once;
              a newcomer left with only its prompt's last token joins the running rows at once,
              that token fed as its next one
    prefill   the newcomers' prompts, left-padded together, go through the model at most
              `prefill_tokens` tokens per step, so a long prompt never stalls the running rows;
              a request's score ids (evaluate's reference answer) ride along after its prompt:
              their log-likelihood is read from the same pass; a greedy row takes as its first
              tokens the score ids its own argmax agrees with (their keys and values are already
              in the cache), and the columns after those are masked out
    merge     a prefilled group joins the running batch: the shorter of the two KV caches is padded
              on the left (masked out), then the rows are stacked
    decode    one forward pass feeds every running row the token it sampled last; where the model
              allows (packed.py), the oldest prefill's next chunk rides in that same pass, so a step
              reads the weights once however many newcomers arrive
    leave     a finished row (end of turn, stop string, max_new_tokens, context full, cancelled, or
              an error of its own) is handed back at once; what it held goes to the prompt cache;
              its keys and values are dropped from the batch, with the
              left columns no remaining row uses, when newcomers join or a quarter of the rows have
              finished (until then it is fed padding and its output ignored: dropping copies the cache)

The KV cache is one transformers DynamicCache, right-aligned: the newest token of every row is in
the last column, and the attention mask says which columns each row really has. Positions come
from the mask, so padding never shifts a row. On a CPU, multi-token passes attend grouped
key/value heads without copying them per query head (attention.py). Text is produced
incrementally (the tokenizers library's DecodeStream), never by decoding the whole answer again
at every token.

Isolation: what belongs to one request (its sampler, its seed, its callbacks) can fail that
request only. A forward pass that raises is undone and retried on halves of the batch until the row
that makes it fail is found; that row fails, the others go on.

One request's own part (its settings, sampler and text) is in request.py. Greedy decoding gives
token for token what `model.generate` gives; tests/test_engine.py checks it.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.infer import laid_out
from tunesmith.infer.attention import grouped_query_attention
from tunesmith.infer.packed import Part, packable, packed_forward, per_token, routable, tokens_routed
from tunesmith.infer.prompt_cache import MIN_MATCH, Entry, PromptCache

# Request and Sampling are imported from here by the callers: the engine's public names
from tunesmith.infer.request import Request, Row, Sampling, choose_tokens  # noqa: F401
from tunesmith.train import memory

# Keys and values kept of what rows held when they finished (prompt_cache.py), all adapters together:
# about 11,000 tokens of SmolLM2-135M in bf16, 2,000 of a 7B model with 8 key/value heads
PROMPT_CACHE_BYTES = 256 << 20
# A newcomer whose prompt is all but read already (a cached match leaves at most this many tokens)
# is prefilled apart from those with much to read: a prefill is a rectangle, and one short row next to
# a long one would be padded to its length
SHORT_REST = 8
# A finished row stays in the running batch (fed, its output ignored) until this share of the rows
# has finished or newcomers join: dropping rows copies every remaining row's keys and values, which
# costs more than feeding a few finished rows for a few more steps (evaluate's 240 rows: 60 MB per
# layer per copy)
COMPACT_SHARE = 0.25
# Rows x columns of logits one prefill step keeps where score ids are read (each a vocabulary of
# floats: 1024 x 49k fp32 = 200 MB); more columns wait for the next step
MAX_SCORED_LOGITS = 1024


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow (None: not stated)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---- rows sharing a KV cache -----------------------------------------------------------------

def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer, each (rows, kv_heads, width, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]], used: int | None = None):
    """A cache of these keys and values (copied into buffers with spare room); with `used`, the
    layers are such buffers already (see _buffers), of which the first `used` columns are taken as
    they are, without a copy."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _growing_layer()
    for index, (keys, values) in enumerate(layers):
        if used is None:
            cache.update(keys, values, index)
            continue
        layer = cache.layer_class_to_replicate()
        layer.lazy_initialization(keys, values)
        layer.buffers = keys, values
        layer.keys, layer.values = keys[:, :, :used], values[:, :, :used]
        cache.layers.append(layer)
    return cache


def _room(needed: int) -> int:
    """Columns a cache buffer holding `needed` gets: half as many again to grow into, at least 16."""
    return needed + max(needed // 2, 16)


def _buffers(like: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty keys and values buffers of `rows` rows with room to grow past `width` columns."""
    shape = (rows, like.shape[1], _room(width), like.shape[3])
    return like.new_empty(shape), like.new_empty(shape)


@functools.cache
def _growing_layer():
    """transformers' DynamicLayer concatenates every new column onto the whole cache (a copy of all
    keys and values, every layer, every step). This one writes new columns into spare room at the
    end of a buffer and hands out views of it; the buffer grows by half again when full."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            used = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            needed = used + key_states.shape[-2]
            ours = self.buffers is not None and self.keys.data_ptr() == self.buffers[0].data_ptr()
            if not ours or self.buffers[0].shape[-2] < needed:  # (not ours: keys replaced from outside)
                room = (*key_states.shape[:2], _room(needed), key_states.shape[-1])
                buffers = key_states.new_empty(room), value_states.new_empty(room)
                if used:
                    buffers[0][:, :, :used], buffers[1][:, :, :used] = self.keys, self.values
                self.buffers = buffers
            keys, values = self.buffers
            keys[:, :, used:needed], values[:, :, used:needed] = key_states, value_states
            self.keys, self.values = keys[:, :, :needed], values[:, :, :needed]
            return self.keys, self.values

    return GrowingLayer


@dataclass
class _Group:
    """Rows that share one right-aligned KV cache."""

    rows: list[Row]
    cache: object  # a DynamicCache holding `width` columns per row
    mask: torch.Tensor  # (rows, width): 1 where the row has a real token

    @property
    def width(self) -> int:
        return self.mask.shape[1]


def _select(group: _Group, slots: list[int]) -> _Group:
    """A new group of the rows at `slots`, without the left columns none of them uses."""
    return _combine([(group, slots)])


def _merge(groups: list[_Group]) -> _Group:
    """One group of all the rows: the narrower caches padded on the left with masked zeros."""
    return groups[0] if len(groups) == 1 else _combine([(group, None) for group in groups])


def _combine(parts: list[tuple[_Group, list[int] | None]]) -> _Group:
    """One group of the rows at the given slots of each group (None: all of them), each group's left
    columns that none of its kept rows uses dropped, the narrower ones padded on the left with masked
    zeros. Every kept row's keys and values are written once, straight into the new buffers (rows
    leaving and rows joining cost one copy, not one each)."""
    device = parts[0][0].mask.device
    kept = []  # (group, row index or None, its mask from its first used column, that column)
    for group, slots in parts:
        index = None if slots is None else torch.tensor(slots, device=device)
        mask = group.mask if index is None else group.mask[index]
        start = int(mask.any(0).long().argmax())  # the first column some kept row uses
        kept.append((group, index, mask[:, start:], start))
    width = max(mask.shape[1] for _, _, mask, _ in kept)
    rows = sum(len(mask) for _, _, mask, _ in kept)
    layers = []
    for kv in zip(*[_layers(group.cache) for group, _, _, _ in kept]):  # each layer: every group's keys, values
        into = _buffers(kv[0][0], rows, width)
        first = 0
        for (keys, values), (_, index, mask, start) in zip(kv, kept):
            end, pad = first + len(mask), width - mask.shape[1]
            for buffer, part in zip(into, (keys, values)):
                if pad:
                    buffer[first:end, :, :pad] = 0  # masked out, but must not be NaN: 0 x NaN is NaN
                if index is None:
                    buffer[first:end, :, pad:width] = part[:, :, start:]
                else:
                    torch.index_select(part[:, :, start:], 0, index, out=buffer[first:end, :, pad:width])
            first = end
        layers.append(into)
    mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, _, mask, _ in kept])
    rows_kept = [group.rows[slot] for group, slots in parts for slot in (slots if slots is not None else
                                                                         range(len(group.rows)))]
    return _Group(rows_kept, _cache(layers, used=width), mask)


def _live(group: _Group) -> _Group:
    """The group without its finished rows."""
    live = [slot for slot, row in enumerate(group.rows) if not row.done]
    return group if len(live) == len(group.rows) else _select(group, live)


def _crop(group: _Group) -> None:
    """Undo a forward pass that failed half-way: layers that took a new column give it back."""
    group.cache = _cache([(k[:, :, :group.width], v[:, :, :group.width]) for k, v in _layers(group.cache)])


@dataclass
class _Prefill:
    """Newcomers' prompts going through the model, a chunk of columns per step. Where the prompt
    cache holds a row's beginning, the row's cache starts with it (right-aligned at `skip`), and the
    rest of each prompt follows, left-padded: [pad..][cached][pad..][rest of the prompt]; the mask
    marks the holes, positions skip them.

    A request with score_ids has them right after its prompt: [prefix][pad..][rest][score ids]. The
    logits that predict them give their log-likelihood; the prompt's last column gives the first
    token. A plain greedy row whose argmax agrees with its first k score ids would decode exactly
    those k tokens: it takes them at once, and its next token comes from the column after them
    (speculative decoding, with the reference answer as the draft). Once prefilled, the score
    columns no row took are masked out and each answer continues from where it is."""

    rows: list[Row]
    ids: torch.Tensor  # (rows, width), the prompts after their cached beginnings (and score ids), left-padded
    mask: torch.Tensor  # (rows, prefix + width)
    cache: object  # holds the prefix's columns, then the ones prefilled so far
    skip: int = 0  # columns of cached beginnings (the longest row's)
    done: int = 0  # columns of `ids` already in the cache
    tails: torch.Tensor | None = None  # (rows,) score ids after each prompt (None: no row has any)
    first: torch.Tensor | None = None  # (rows, vocab) logits of each row's next token, once read
    scores: _Scores | None = None
    greedy: torch.Tensor | None = None  # (rows,) bool: plain greedy (argmax of the raw logits)
    agreed: torch.Tensor | None = None  # (rows,) leading score ids a plain greedy row's argmax agrees with


@dataclass
class _Scores:
    """The score ids of a prefill's rows and their log-likelihood as it is read, chunk by chunk."""

    targets: torch.Tensor  # (rows, longest tail) token ids, 0 past a row's tail
    counted: torch.Tensor  # (rows, longest tail) bool: a target that counts
    logprob: torch.Tensor  # (rows,) float64, summed so far
    count: torch.Tensor  # (rows,) long

    @classmethod
    def of(cls, rows: list[Row], device) -> _Scores:
        longest = max(len(row.request.score_ids) for row in rows)
        targets = torch.zeros((len(rows), longest), dtype=torch.long)
        counted = torch.zeros((len(rows), longest), dtype=torch.bool)
        for index, row in enumerate(rows):
            ids, flags = row.request.score_ids, row.request.score_counted or [True] * len(row.request.score_ids)
            targets[index, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            counted[index, :len(ids)] = torch.tensor(flags, dtype=torch.bool)
        return cls(targets.to(device), counted.to(device), torch.zeros(len(rows), dtype=torch.float64, device=device),
                   torch.zeros(len(rows), dtype=torch.long, device=device))


def _common_prefix(prompts: list[list[int]]) -> list[int]:
    shortest = min(prompts, key=len)
    for index, token in enumerate(shortest):
        if any(prompt[index] != token for prompt in prompts):
            return shortest[:index]
    return shortest


# ---- the engine --------------------------------------------------------------------------------

class Engine:
    """Continuous batching over one model. `admit` requests at any time; each `step` advances the
    newcomers' prefill by a chunk, feeds every running row one token, and returns the requests that
    finished (text, finish_reason, or error set)."""

    def __init__(self, model, pad_id: int | None, prefill_tokens: int = 256, mixed_adapters: bool = False,
                 prompt_cache_bytes: int = PROMPT_CACHE_BYTES):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id if pad_id is not None else 0
        self.prefill_tokens = prefill_tokens  # prompt tokens (padding included) per step, at most
        self.mixed_adapters = mixed_adapters  # pass each row's adapter name (PEFT LoRA, mixed batch)
        self.max_positions = context_length(model)
        self.keep_last = _accepts_logits_to_keep(model)  # the forward computes only the logits asked for
        self.packs = self.keep_last and packable(model)  # a prefill chunk rides in the decode pass (packed.py)
        self.routes = mixed_adapters and self.packs and routable(model)  # packed.py sends tokens to their adapters
        self.pending: list[Row] = []  # admitted, prefill not started
        self.prefills: deque[_Prefill] = deque()
        self.running: _Group | None = None
        self.prompts = PromptCache(prompt_cache_bytes)  # what finished rows held, to be read from again
        self.refused: list[Request] = []  # failed at admission, handed back by the next step
        if self.device.type == "cpu":
            memory.keep_freed_memory()  # a pass's large blocks are reused, not faulted in afresh each pass
            laid_out.lay_out(model)  # every linear layer's few rows per pass through oneDNN (laid_out.py)

    @property
    def size(self) -> int:
        """Requests in the engine: waiting for prefill, prefilling, or decoding."""
        running = sum(not row.done for row in self.running.rows) if self.running else 0
        return len(self.pending) + sum(len(p.rows) for p in self.prefills) + running

    @property
    def busy(self) -> bool:
        return self.size > 0 or bool(self.refused)

    def admit(self, request: Request, tokenizer, stop_ids: list[int], adapter_name: str | None = None) -> None:
        """Queue a request for the next prefill; one whose settings cannot be used fails at the next step."""
        try:
            if not request.prompt_ids:
                raise ValueError("the prompt is empty")
            self.pending.append(Row(request, tokenizer, stop_ids, adapter_name, self.max_positions))
        except Exception as err:  # noqa: BLE001 — this request's own settings (e.g. a seed torch refuses)
            request.error, request.finish_reason = err, "error"
            self.refused.append(request)

    @torch.inference_mode()  # the server steps from its own thread: without this, autograd recorded
    def step(self) -> list[Request]:  # every pass and chained the cache's in-place writes into one graph
        refused, self.refused = self.refused, []
        finished: list[Row] = []
        if self.pending and not self.prefills:
            self.prefills.extend(self._start_prefills(self.pending))
            self.pending = []
        while self.prefills and self._one_column_left(self.prefills[0]):
            self._join_running(self.prefills.popleft())
        if self.prefills and self.running is not None and self._packs_with_running(self.prefills[0]):
            finished += self._advance_together()
            return refused + [row.request for row in finished]
        if self.prefills:
            finished += self._advance_prefill()
        if self.running is not None:
            finished += self._decode()
        return refused + [row.request for row in finished]

    def abort(self, error: Exception) -> list[Request]:
        """Fail every request still in the engine (the server is stopping)."""
        rows = self.pending + [r for p in self.prefills for r in p.rows] + (self.running.rows if self.running else [])
        rows = [row for row in rows if not row.done]
        for row in rows:
            row.fail(error)
        self.pending, self.prefills, self.running = [], deque(), None
        refused, self.refused = self.refused, []
        return refused + [row.request for row in rows]

    # -- prefill --

    def _learn_prefixes(self, rows: list[Row]) -> bool:
        """Newcomers that begin alike, none of them with anything in the prompt cache: read that
        beginning once, as one row, and keep it, so that they all start after it. Whether any was kept."""
        by_adapter: dict[str | None, list[Row]] = {}
        for row in rows:
            by_adapter.setdefault(row.adapter_name, []).append(row)
        learned = False
        for adapter, group in by_adapter.items():
            prompts = [row.request.prompt_ids for row in group]
            common = _common_prefix(prompts)[: min(map(len, prompts)) - 1]
            if len(group) < 2 or not MIN_MATCH <= len(common) <= self.prefill_tokens:
                continue
            ids = torch.tensor([common], device=self.device)  # (1, prefix)
            cache = _cache([])
            try:
                self._forward(group[:1], ids, torch.ones_like(ids), torch.arange(len(common), device=self.device)[None],
                              cache)
            except Exception:  # noqa: BLE001, S112 — then the prompts are read whole; one that fails, fails there alone
                continue
            self.prompts.add(adapter, common, _layers(cache))
            learned = True
        return learned

    def _start_prefills(self, rows: list[Row]) -> list[_Prefill]:
        """One prefill per adapter for the rows whose beginning is cached (those left with little to
        read apart from the others), one for the rest. Each row's match is looked up once (again
        only for the rows without one, after their common beginning was learned)."""
        found = [self._match(row) for row in rows]
        if self._learn_prefixes([row for row, match in zip(rows, found) if match is None]):
            found = [match or self._match(row) for row, match in zip(rows, found)]
        groups: dict[object, tuple[list[Row], list]] = {}
        for row, match in zip(rows, found):
            rest = len(row.request.prompt_ids) - match[1] if match else None
            key = (row.adapter_name, rest <= SHORT_REST) if rest is not None else ("whole prompts",)
            group = groups.setdefault(key, ([], []))
            group[0].append(row)
            group[1].append(match)
        return [self._start_prefill(group, matches) for group, matches in groups.values()]

    def _match(self, row: Row) -> tuple[Entry, int] | None:
        return self.prompts.find(row.adapter_name, row.request.prompt_ids)

    def _start_prefill(self, rows: list[Row], found: list[tuple[Entry, int] | None] | None = None) -> _Prefill:
        """A prefill of these rows: each one's cached beginning (`found`, else looked up) copied in,
        right-aligned at `skip` columns (the longest of them), then the rest of its prompt (and score
        ids), left-padded."""
        found = found if found is not None else [self._match(row) for row in rows]
        order = sorted(range(len(rows)), key=lambda i: (id(found[i][0]), found[i][1]) if found[i] else (0, 0))
        rows, found = [rows[i] for i in order], [found[i] for i in order]  # rows of one match side by side
        lengths = [match[1] if match else 0 for match in found]
        for length in lengths:
            if length:
                self.prompts.note_hit(length)
        skip = max(lengths)
        rests = [row.request.prompt_ids[length:] + row.request.score_ids for row, length in zip(rows, lengths)]
        width = max(len(rest) for rest in rests)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), skip + width), dtype=torch.long)
        for index, (rest, length) in enumerate(zip(rests, lengths)):
            mask[index, skip - length:skip] = 1
            ids[index, width - len(rest):] = torch.tensor(rest)
            mask[index, skip + width - len(rest):] = 1
        cache = self._cached_beginnings(found, skip, width)
        prefill = _Prefill(rows, ids.to(self.device), mask.to(self.device), cache, skip)
        if any(row.request.score_ids for row in rows):
            prefill.tails = torch.tensor([len(row.request.score_ids) for row in rows], device=self.device)
            prefill.scores = _Scores.of(rows, self.device)
            prefill.agreed = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            prefill.greedy = torch.tensor([row.sampler.plain_greedy for row in rows], device=self.device)
        return prefill

    def _cached_beginnings(self, found: list[tuple[Entry, int] | None], skip: int, width: int):
        """A cache holding each row's cached beginning, right-aligned at `skip` columns (zeros before
        it: masked out, but never NaN), in buffers with room for the prompts' `width` columns and
        then some answer tokens, so that prefilling does not grow them. Rows of one match are side
        by side: each layer takes one copy per match."""
        if skip == 0:
            return _cache([])
        runs: list[tuple[Entry, int, int, int]] = []  # (entry, length, first row, end row)
        for index, match in enumerate(found):
            if match is None:
                continue
            if runs and runs[-1][0] is match[0] and runs[-1][1] == match[1] and runs[-1][3] == index:
                runs[-1] = (*runs[-1][:3], index + 1)
            else:
                runs.append((*match, index, index + 1))
        holes = any(match is None or match[1] < skip for match in found)  # columns no cached entry fills
        layers = []
        for layer, (like, _) in enumerate(runs[0][0].layers):
            into = _buffers(like, len(found), skip + width)
            for buffer in into if holes else ():
                buffer[:, :, :skip] = 0
            for entry, length, first, end in runs:
                keys, values = entry.layers[layer]
                into[0][first:end, :, skip - length:skip] = keys[:, :, :length]
                into[1][first:end, :, skip - length:skip] = values[:, :, :length]
            layers.append(into)
        return _cache(layers, used=skip)

    def _advance_prefill(self) -> list[Row]:
        """The next chunk of the oldest prefill, in a pass of its own; when its prompts are all in, the
        first tokens are sampled and the rows join the running batch."""
        prefill = self.prefills[0]
        part, end, read_from = self._prefill_part(prefill)
        try:
            logits = self._forward(prefill.rows, part.ids, part.mask, part.positions, part.cache, part.keep)
            if end > read_from:
                self._read_logits(prefill, logits, end)
        except Exception as err:  # noqa: BLE001 — retried one prompt at a time; the one that fails, fails alone
            self.prefills.popleft()
            return self._split_failed_prefill(prefill, err)
        return self._prefilled(prefill, end)

    def _prefill_part(self, prefill: _Prefill) -> tuple[Part, int, int]:
        """The next chunk of a prefill as a pass's part, where it ends, and the first column whose logits
        are read."""
        end, read_from = self._chunk_end(prefill)
        columns = slice(prefill.skip + prefill.done, prefill.skip + end)  # of the mask and the cache
        positions = (prefill.mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift a row's positions
        keep = max(1, end - max(prefill.done, read_from))  # the columns whose logits are read
        return Part(prefill.ids[:, prefill.done:end], prefill.mask[:, :columns.stop], positions[:, columns],
                    prefill.cache, keep, self._names(prefill.rows)), end, read_from

    def _prefilled(self, prefill: _Prefill, end: int) -> list[Row]:
        """A chunk is in: once the prompts are all in, the first tokens are sampled and the rows join
        the running batch; the rows this finishes."""
        prefill.done = end
        if end < prefill.ids.shape[1]:
            return []
        self.prefills.popleft()
        group = _Group(prefill.rows, prefill.cache, self._end_of_prompts(prefill))
        finished = self._take_agreed(prefill)
        finished += self._take_tokens(group, prefill.first)
        if not all(row.done for row in group.rows):
            self.running = self._with_running(_live(group))
        return finished

    @staticmethod
    def _one_column_left(prefill: _Prefill) -> bool:
        """Whether all the prefill has left to read is each prompt's last token (the rest was in the
        prompt cache, or read in earlier chunks) and no score ids are to be read with it."""
        return prefill.tails is None and prefill.ids.shape[1] - prefill.done == 1

    def _join_running(self, prefill: _Prefill) -> None:
        """The prefill's rows join the running batch as if decoding: their prompts' last tokens are
        fed as their next tokens in the running rows' own pass, whose logits give their first
        answer tokens (a pass of one column per row, not a second part beside the running rows')."""
        for row, token in zip(prefill.rows, prefill.ids[:, -1].tolist()):
            row.next_token = token
        self.running = self._with_running(_Group(prefill.rows, prefill.cache, prefill.mask[:, :-1]))  # the
        # columns the cache holds

    def _with_running(self, group: _Group) -> _Group:
        """The running rows still going, and the group's rows after them, in one group."""
        if self.running is None:
            return group
        live = [slot for slot, row in enumerate(self.running.rows) if not row.done]
        return _combine([(self.running, live), (group, None)]) if live else group

    def _packs_with_running(self, prefill: _Prefill) -> bool:
        """Whether the prefill's next chunk can go through the running rows' decode pass: a model
        packed.py knows; rows of several adapters where packed.py can route each token to its own."""
        if not self.packs:
            return False
        return self.routes or len({row.adapter_name for row in prefill.rows + self.running.rows}) == 1

    def _advance_together(self) -> list[Row]:
        """One pass: every running row's next token and the oldest prefill's next chunk. Should it
        raise, the running rows' cache is cropped back, the prefill starts over, and both go through
        passes of their own, which find the row at fault."""
        prefill, group = self.prefills[0], self.running
        chunk, end, read_from = self._prefill_part(prefill)
        tokens, mask, positions = self._feed_inputs(group)
        running = Part(tokens, mask, positions, group.cache, adapters=self._names(group.rows))
        try:
            decoded, logits = packed_forward(self.model, [running, chunk])
            if end > read_from:
                self._read_logits(prefill, logits, end)
        except Exception:  # noqa: BLE001 — undone; the separate passes below isolate the failure
            _crop(group)
            self.prefills[0] = self._start_prefill(prefill.rows)  # read again from the start (scores too)
            return self._advance_prefill() + self._decode()
        group.mask = mask
        return self._decoded([(group, decoded[:, -1])], []) + self._prefilled(prefill, end)

    def _chunk_end(self, prefill: _Prefill) -> tuple[int, int]:
        """Where this step's chunk of `prefill.ids` ends, and the first column whose logits are read
        (the last prompt token of the row with the most score ids; the last column without any)."""
        end = min(prefill.done + max(1, self.prefill_tokens // len(prefill.rows)), prefill.ids.shape[1])
        read_from = prefill.ids.shape[1] - 1 - (int(prefill.tails.max()) if prefill.tails is not None else 0)
        if prefill.tails is not None and end > read_from:
            end = min(end, max(prefill.done, read_from) + max(1, MAX_SCORED_LOGITS // len(prefill.rows)))
        return end, read_from

    @staticmethod
    def _read_logits(prefill: _Prefill, logits: torch.Tensor, end: int) -> None:
        """From the logits of the columns before `end` (rows, kept, vocab): each prompt's next-token
        logits, and the log-likelihood of the score ids they predict."""
        if prefill.tails is None:  # the last column of the last chunk: every prompt's next token
            prefill.first = logits[:, -1]
            return
        width, kept, tails = prefill.ids.shape[1], logits.shape[1], prefill.tails
        if prefill.first is None:
            prefill.first = logits.new_zeros((len(prefill.rows), logits.shape[-1]))
        last_prompt_column = width - 1 - tails  # (rows,)
        for offset in range(kept):
            predicts = (end - kept + offset) - last_prompt_column  # (rows,): the score id this column predicts
            Engine._agree(prefill, logits[:, offset], predicts)
            scoring = ((predicts >= 0) & (predicts < tails)).nonzero().flatten()
            if len(scoring):
                which = predicts[scoring]
                logp = torch.log_softmax(logits[scoring, offset], dim=-1)
                picked = logp.gather(1, prefill.scores.targets[scoring, which][:, None]).squeeze(1)
                counted = prefill.scores.counted[scoring, which]
                prefill.scores.logprob[scoring] += (picked.double() * counted)
                prefill.scores.count[scoring] += counted.long()

    @staticmethod
    def _agree(prefill: _Prefill, logits: torch.Tensor, predicts: torch.Tensor) -> None:
        """Each row's next-token logits are those of the column after what it has taken: its prompt's
        end, or for a plain greedy row, the last of the score ids its argmax has agreed with so far."""
        taken = torch.where(prefill.greedy, prefill.agreed, 0)
        here = (predicts == taken).nonzero().flatten()
        checks = here[prefill.greedy[here] & (predicts[here] < prefill.tails[here])]
        if len(checks):
            agrees = logits[checks].argmax(-1) == prefill.scores.targets[checks, predicts[checks]]
            prefill.agreed[checks[agrees]] += 1  # these take the score id: their next logits come later
            here = here[~torch.isin(here, checks[agrees])]
        prefill.first[here] = logits[here]  # copied once per row, where its own tokens end

    @staticmethod
    def _end_of_prompts(prefill: _Prefill) -> torch.Tensor:
        """The mask the answers continue from: the score ids' log-likelihood handed to their requests,
        the score columns after those each row takes masked out."""
        if prefill.tails is None:
            return prefill.mask
        for row, logprob, count in zip(prefill.rows, prefill.scores.logprob.tolist(), prefill.scores.count.tolist()):
            row.request.score_logprob, row.request.score_count = logprob, count
        width = prefill.mask.shape[1]
        columns = torch.arange(width, device=prefill.mask.device)[None, :]  # (1, width)
        return prefill.mask * (columns < (width - prefill.tails + prefill.agreed)[:, None])

    @staticmethod
    def _take_agreed(prefill: _Prefill) -> list[Row]:
        """Greedy rows take the score ids their argmax agreed with, as decoding would have; the rows
        this finishes (an end of turn among them, a stop string, max_new_tokens)."""
        if prefill.agreed is None:
            return []
        finished = []
        for row, count in zip(prefill.rows, prefill.agreed.tolist()):
            try:
                for token in row.request.score_ids[:count]:
                    row.take(token)
                    if row.done:
                        break
            except Exception as err:  # noqa: BLE001 — this request's own failure (e.g. its text callback)
                row.fail(err)
            if row.done:
                finished.append(row)
        return finished

    def _split_failed_prefill(self, prefill: _Prefill, error: Exception) -> list[Row]:
        if len(prefill.rows) == 1:
            prefill.rows[0].fail(error)
            return prefill.rows
        for row in reversed(prefill.rows):
            self.prefills.appendleft(self._start_prefill([row]))
        return []

    # -- decode --

    def _decode(self) -> list[Row]:
        """Feed every running row its last token; drop the rows that finish."""
        return self._decoded(*self._feed(self.running))

    def _decoded(self, outcomes: list[tuple[_Group, torch.Tensor]], failed: list[Row]) -> list[Row]:
        """Each fed row takes its next token; the running batch is what goes on."""
        finished = list(failed)
        for group, logits in outcomes:
            finished += self._take_tokens(group, logits)
        groups = [group for group, _ in outcomes]
        rows = [row for group in groups for row in group.rows]
        if not rows:
            self.running = None
            return finished
        group = _merge(groups)  # after a failure: the halves that went on, together again
        finished_share = sum(row.done for row in rows) / len(rows)
        self.running = None if finished_share == 1 else _live(group) if finished_share >= COMPACT_SHARE else group
        return finished

    def _feed(self, group: _Group) -> tuple[list[tuple[_Group, torch.Tensor]], list[Row]]:
        """One decode forward pass of `group`: [(group, logits (rows, vocab))] and the rows that failed.
        When the pass raises, it is undone and the halves are fed apart, down to the row that fails."""
        tokens, mask, positions = self._feed_inputs(group)
        try:
            logits = self._forward(group.rows, tokens, mask, positions, group.cache)[:, -1]
        except Exception as err:  # noqa: BLE001 — find the offending row; the others must go on
            _crop(group)
            if len(group.rows) == 1:
                if group.rows[0].done:  # finished already (handed back then): just dropped
                    return [], []
                group.rows[0].fail(err)
                return [], group.rows
            half = len(group.rows) // 2
            first = self._feed(_select(group, list(range(half))))
            second = self._feed(_select(group, list(range(half, len(group.rows)))))
            return first[0] + second[0], first[1] + second[1]
        group.mask = mask
        return [(group, logits)], []

    def _feed_inputs(self, group: _Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode pass's tokens (rows, 1), mask (rows, width + 1) and positions (rows, 1)."""
        tokens = torch.tensor([[self.pad_id if row.done else row.next_token] for row in group.rows],
                              device=self.device)  # a finished row's output is ignored
        positions = group.mask.sum(-1, keepdim=True)  # real tokens before this one
        if self.max_positions:  # a finished row still fed may be past the model's context; its output is ignored
            positions = positions.clamp(max=self.max_positions - 1)
        return tokens, torch.cat([group.mask, group.mask.new_ones((len(group.rows), 1))], dim=1), positions

    def _names(self, rows: list[Row]) -> list[str] | None:
        """Each row's adapter name, for a PEFT model serving several adapters at once; else None."""
        return [row.adapter_name for row in rows] if self.mixed_adapters else None

    def _forward(self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache, keep: int = 1) -> torch.Tensor:
        """Logits of the last `keep` columns, (rows, keep, vocab) fp32; `cache` takes the new columns.
        Rows of several adapters go each through its own: packed.py's routing where it can (built
        once a pass, where PEFT's own builds each adapter's row list again in every layer)."""
        names, per_row, routed = self._names(rows), {}, nullcontext()
        if names is not None and self.routes and len(set(names)) > 1:
            routed = tokens_routed(self.model, per_token(names, ids.shape[1]))
        elif names is not None:
            per_row = {"adapter_names": names}
        limit = {"logits_to_keep": _last_columns(keep, ids.shape[1], ids.device)} if self.keep_last else {}
        with grouped_query_attention(self.model), routed:
            output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, **limit, **per_row)
        return output.logits[:, -keep:, :].float()

    def _take_tokens(self, group: _Group, logits: torch.Tensor) -> list[Row]:
        """Each row takes its next token; an error in one row's sampling or callback fails that row."""
        finished = []
        live = [slot for slot, row in enumerate(group.rows) if not row.done]  # finished earlier, or by the
        rows = [group.rows[slot] for slot in live]  # score ids it took (see _take_agreed)
        for slot, row, token in zip(live, rows, choose_tokens(rows, logits if len(live) == len(group.rows) else logits[live])):
            try:
                if isinstance(token, Exception):
                    raise token
                row.take(token)
            except Exception as err:  # noqa: BLE001 — this request's own failure
                row.fail(err)
            if row.done:
                finished.append(row)
                self._keep(group, slot)
        return finished

    def _keep(self, group: _Group, slot: int) -> None:
        """Into the prompt cache: what the finished row at `slot` holds (its prompt and the answer
        tokens fed back), for a next prompt that begins with it (a chat's next turn). Not a failed
        row, nor one of evaluate's (its cache has its score ids, and its prompt is asked once)."""
        row = group.rows[slot]
        request = row.request
        if request.error is not None or request.score_ids or self.prompts.max_bytes == 0:
            return
        columns = group.mask[slot].nonzero().flatten()  # its real tokens, in order
        fed = request.prompt_ids + request.completion_ids
        if not len(request.prompt_ids) <= len(columns) <= len(fed):
            return
        layers = [(keys[slot:slot + 1, :, columns], values[slot:slot + 1, :, columns]) for keys, values in
                  _layers(group.cache)]
        self.prompts.add(row.adapter_name, fed[:len(columns)], layers)


def _last_columns(keep: int, columns: int, device) -> int | torch.Tensor:
    """logits_to_keep for the last `keep` of `columns`. As a count, transformers keeps them as a view
    of the hidden states strided across rows, and torch's CPU multiply of such a view by the output
    layer is 2-9x (fp32) and 90-550x (bf16) slower than of the same rows side by side
    (bench/output_layer.py --strided); as column indices they are gathered side by side."""
    return keep if keep >= columns else torch.arange(columns - keep, columns, device=device)


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def decode(model, tokenizer, requests: list[Request], stop_ids: list[int], pad_id: int,
           adapter_names: list[str] | None = None, batch_size: int | None = None,
           on_finished: Callable[[Request], None] | None = None, prefill_tokens: int = 256,
           engine: Engine | None = None) -> None:
    """Run the requests to completion, at most `batch_size` at a time (all by default), a new one
    joining as soon as one finishes; results land in each Request. `adapter_names` (one per request,
    "__base__" for none) runs a PEFT LoRA model with a different adapter per row. An idle `engine`
    of this model may be given (its prompt cache is kept between calls; a chat's turns). The first
    error of a request is raised once the others are done."""
    if engine is None or engine.busy:
        engine = Engine(model, pad_id, prefill_tokens, mixed_adapters=adapter_names is not None)
    waiting = deque(range(len(requests)))
    limit = batch_size or len(requests)
    while waiting or engine.busy:
        while waiting and engine.size < limit:
            index = waiting.popleft()
            engine.admit(requests[index], tokenizer, stop_ids, adapter_names[index] if adapter_names else None)
        for request in engine.step():
            if on_finished is not None:
                on_finished(request)
    failed = [r for r in requests if r.error is not None]
    if failed:
        raise failed[0].error
