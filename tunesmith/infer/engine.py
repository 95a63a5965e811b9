"""The one token loop behind `generate`, `evaluate`, `chat` and `serve`: continuous batching.

transformers' `generate` applies one set of sampling settings to a whole batch and keeps a row
until the longest answer ends. Here every request brings its own settings, joins the running batch
between two decode steps, and leaves it the moment it is finished:

    admit     a request waits with its sampler (transformers' logits processors, its own seeded
              generator), its stop tokens, its adapter
    prefill   the newcomers' prompts, left-padded together, go through the model at most
              `prefill_tokens` tokens per step, so a long prompt never stalls the running rows
    merge     a prefilled group joins the running batch: the shorter of the two KV caches is padded
              on the left (masked out), then the rows are stacked
    decode    one forward pass feeds every running row the token it sampled last
    leave     a finished row (end of turn, stop string, max_new_tokens, context full, cancelled, or
              an error of its own) is dropped from the cache at once, with the left columns that no
              remaining row uses

The KV cache is one transformers DynamicCache, right-aligned: the newest token of every row is in
the last column, and the attention mask says which columns each row really has. Positions come
from the mask, so padding never shifts a row. Text is produced incrementally (the tokenizers
library's DecodeStream), never by decoding the whole answer again at every token.

Isolation: what belongs to one request (its sampler, its seed, its callbacks) can fail that
request only. A forward pass that raises is undone and retried on halves of the batch until the row
that makes it fail is found; that row fails, the others go on.

Greedy decoding gives token for token what `model.generate` gives; tests/test_engine.py checks it.
"""

from __future__ import annotations

import inspect
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MAX_SEED = 2**63 - 1  # a torch.Generator seed is a 64-bit integer; OpenAI clients send int64
# top-p sampling looks at this many of the most likely tokens first; only when they hold less than
# top_p of the probability is the whole vocabulary sorted (49k tokens x rows: the slowest part of a step)
NUCLEUS_CANDIDATES = 256
# Prompts that begin alike (a chat template's system block) share the keys and values of that
# beginning once it is at least this many tokens: a newcomer's prefill starts after it
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (the most likely token every time)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 = no limit
    repetition_penalty: float = 1.0  # > 1 makes tokens already in prompt or answer less likely
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    seed: int | None = None  # fixes the sampled tokens of one request (0 .. 2**63-1)

    def problems(self) -> list[str]:
        """What is wrong with these settings, in the words of the option names."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature={self.temperature} must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be 0 (no limit) or more")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"repetition_penalty={self.repetition_penalty} must be a positive number")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed={self.seed} must be between 0 and 2**63-1 ({MAX_SEED})")
        return problems


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling
    on_text: Callable[[str], None] | None = None  # each new piece of the answer, as it is produced
    cancelled: bool = False  # set from another thread: the row leaves the batch at the next token
    # filled in by the loop:
    text: str = ""
    completion_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: Exception | None = None  # why this request failed (finish_reason "error")


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow (None: not stated)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---- one request: sampling and text ----------------------------------------------------------

class _Sampler:
    """One request's choice of the next token: transformers' logits processors, in `generate`'s
    order (repetition penalty, temperature, top-k, top-p), and the request's own generator."""

    def __init__(self, sampling: Sampling, prompt_ids: list[int]):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.greedy = sampling.temperature == 0.0
        self.sampling = sampling
        self.processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if not self.greedy:
            if sampling.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                self.processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(sampling.top_p))
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.history = list(prompt_ids)  # prompt and answer so far, for the repetition penalty

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits: a whole batch of such rows is chosen in one call."""
        return self.greedy and not self.processors

    @property
    def shares_warpers(self) -> bool:
        """Without a repetition penalty (which reads each row's own history) the processors see the
        logits alone, so rows with equal settings go through them together."""
        return not any(type(p).__name__.startswith("Repetition") for p in self.processors)

    def choose(self, samplers: list[_Sampler], logits: torch.Tensor) -> list[int]:
        """The next tokens of rows with this sampler's settings, from their logits (rows, vocab), fp32;
        each row draws with its own generator."""
        if self.shares_warpers and not self.greedy and self.sampling.top_p < 1.0:
            nucleus = _nucleus(logits / self.sampling.temperature, self.sampling.top_k, self.sampling.top_p)
            if nucleus is not None:
                ids, weights = nucleus  # (rows, candidates) each
                return [int(row_ids[torch.multinomial(row, 1, generator=sampler.generator)])
                        for row_ids, row, sampler in zip(ids, weights, samplers)]
        if self.shares_warpers:
            scores = self.processors(None, logits)
        else:  # one row: the penalty needs its history
            scores = self.processors(torch.tensor([self.history], device=logits.device), logits)  # (1, seen)
        if self.greedy:
            return scores.argmax(-1).tolist()
        probabilities = torch.softmax(scores, dim=-1).cpu()  # (rows, vocab)
        return [int(torch.multinomial(row, 1, generator=sampler.generator))
                for row, sampler in zip(probabilities, samplers)]

    @property
    def settings(self) -> tuple:
        return tuple((type(p).__name__, *sorted(vars(p).items())) for p in self.processors), self.greedy


def _nucleus(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What transformers' TopK and TopP warpers keep of `scores` (rows, vocab), found among the
    NUCLEUS_CANDIDATES most likely tokens: their ids and sampling weights, each (rows, candidates).
    None when some row's nucleus may reach beyond them (the caller then sorts the whole vocabulary)."""
    if top_k > NUCLEUS_CANDIDATES:
        return None
    count = min(top_k or NUCLEUS_CANDIDATES, scores.shape[-1])
    top_scores, ids = scores.topk(count)  # (rows, count), most likely first
    pool = top_scores if top_k else scores  # top-k renormalises over the k kept tokens
    probabilities = (top_scores - pool.logsumexp(-1, keepdim=True)).exp()
    before = probabilities.cumsum(-1) - probabilities  # the mass of the more likely tokens
    if count < scores.shape[-1] and not top_k and bool((before[:, -1] + probabilities[:, -1] < top_p).any()):
        return None
    keep = before < top_p  # TopP: drop a token once the more likely ones hold top_p
    keep[:, 0] = True
    return ids, probabilities * keep


def _choose_tokens(rows: list[_Row], logits: torch.Tensor) -> list[int | Exception]:
    """Every row's next token (or what went wrong with that row): plain greedy rows by one argmax,
    rows with the same sampling settings through the logits processors together."""
    tokens: list[int | Exception] = logits.argmax(-1).tolist()  # (rows,)
    groups: dict[tuple, list[int]] = {}
    for slot, row in enumerate(rows):
        sampler = row.sampler
        if not sampler.plain_greedy:
            key = sampler.settings if sampler.shares_warpers else ("row", slot)
            groups.setdefault(key, []).append(slot)
    for slots in groups.values():
        try:
            chosen = rows[slots[0]].sampler.choose([rows[s].sampler for s in slots], logits[slots])
        except Exception:  # noqa: BLE001 — again one row at a time: the row at fault fails alone
            chosen = [_choose_one(rows[s], logits[s: s + 1]) for s in slots]
        for slot, token in zip(slots, chosen):
            tokens[slot] = token
    return tokens


def _choose_one(row: _Row, logits: torch.Tensor) -> int | Exception:
    try:
        return row.sampler.choose([row.sampler], logits)[0]
    except Exception as err:  # noqa: BLE001 — returned to fail this row only
        return err


def _text_stream(tokenizer) -> Callable[[int], str]:
    """A function from the next token to the text it adds (maybe "" while a character is incomplete).
    The tokenizers library's DecodeStream does constant work per token; tokenizers without a Rust
    backend, or that clean up spaces after decoding, use the window method of vLLM/TGI."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(backend, token) or ""
    return _WindowDecoder(tokenizer).step


class _WindowDecoder:
    """Decode a few recent tokens with and without the new one; the difference is the new text,
    held back while it ends in half a character (U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def step(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class _Row:
    """One request while it is decoded: its sampler, its text so far, what has been handed out."""

    def __init__(self, request: Request, tokenizer, stop_ids: list[int], adapter_name: str | None,
                 max_positions: int | None):
        self.request = request
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.adapter_name = adapter_name  # PEFT adapter of this row in a mixed batch ("__base__": none)
        self.max_positions = max_positions
        self.done = False
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.emitted = 0  # characters of text already handed to on_text
        self.streamed = ""  # the answer's text as produced so far
        self.sampler = _Sampler(request.sampling, request.prompt_ids)
        self.next_text = _text_stream(tokenizer)

    def take(self, token: int) -> None:
        """Record the sampled token; `done` once the request is finished."""
        request = self.request
        if request.cancelled:
            return self.finish("cancelled")
        if token in self.stop_ids:
            return self.finish("stop")
        request.completion_ids.append(token)
        self.sampler.history.append(token)
        self.next_token = token
        piece = self.next_text(token)
        if piece:
            self.streamed += piece
            cut = _first_stop(self.streamed, request.sampling.stop, len(self.streamed) - len(piece))
            if cut is not None:
                return self.finish("stop", self.streamed[:cut])
        request.text = self.streamed
        if len(request.completion_ids) >= request.sampling.max_new_tokens or self._context_full():
            return self.finish("length")
        self._emit(_safe_end(self.streamed, request.sampling.stop))

    def _context_full(self) -> bool:
        used = len(self.request.prompt_ids) + len(self.request.completion_ids)
        return self.max_positions is not None and used >= self.max_positions

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the request; its text is decoded once, whole, so that it is exactly what the
        tokenizer's decode gives (the stream may still hold back the bytes of a last character)."""
        if text is None:
            whole = self.tokenizer.decode(self.request.completion_ids, skip_special_tokens=True)
            text = whole if whole.startswith(self.streamed) else self.streamed
            cut = _first_stop(text, self.request.sampling.stop, len(self.streamed))
            text, reason = (text, reason) if cut is None else (text[:cut], "stop")
        self.request.text, self.request.finish_reason, self.done = text, reason, True
        self._emit(len(text))

    def fail(self, error: Exception) -> None:
        self.request.error, self.request.finish_reason, self.done = error, "error", True

    def _emit(self, end: int) -> None:
        if end > self.emitted and self.request.on_text is not None:
            self.request.on_text(self.request.text[self.emitted:end])
        self.emitted = max(self.emitted, end)


def _first_stop(text: str, stops: tuple[str, ...], new_from: int = 0) -> int | None:
    """Where the first stop string starts, looking only where text from `new_from` on could complete one."""
    found = [text.find(s, max(0, new_from - len(s) + 1)) for s in stops]
    found = [index for index in found if index >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of the text can be handed out: not a half-decoded character (shown as U+FFFD), and
    not a tail that may yet grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end -= size
                break
    return end


# ---- rows sharing a KV cache -----------------------------------------------------------------

def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer, each (rows, kv_heads, width, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


@dataclass
class _Group:
    """Rows that share one right-aligned KV cache."""

    rows: list[_Row]
    cache: object  # a DynamicCache holding `width` columns per row
    mask: torch.Tensor  # (rows, width): 1 where the row has a real token

    @property
    def width(self) -> int:
        return self.mask.shape[1]


def _select(group: _Group, slots: list[int]) -> _Group:
    """A new group of the rows at `slots`, without the left columns none of them uses."""
    index = torch.tensor(slots, device=group.mask.device)
    mask = group.mask[index]  # (kept, width)
    start = int(mask.any(0).long().argmax())  # the first column some kept row uses
    layers = [(keys[index, :, start:], values[index, :, start:]) for keys, values in _layers(group.cache)]
    return _Group([group.rows[slot] for slot in slots], _cache(layers), mask[:, start:])


def _merge(groups: list[_Group]) -> _Group:
    """One group of all the rows: the narrower caches padded on the left with masked zeros."""
    if len(groups) == 1:
        return groups[0]
    width = max(g.width for g in groups)
    pads = [width - g.width for g in groups]
    mask = torch.cat([F.pad(g.mask, (pad, 0)) for g, pad in zip(groups, pads)])  # (rows, width)
    per_layer = zip(*[_layers(g.cache) for g in groups])
    layers = [(torch.cat([F.pad(k, (0, 0, pad, 0)) for (k, _), pad in zip(kv, pads)]),
               torch.cat([F.pad(v, (0, 0, pad, 0)) for (_, v), pad in zip(kv, pads)])) for kv in per_layer]
    return _Group([row for g in groups for row in g.rows], _cache(layers), mask)


def _crop(group: _Group) -> None:
    """Undo a forward pass that failed half-way: layers that took a new column give it back."""
    group.cache = _cache([(k[:, :, :group.width], v[:, :, :group.width]) for k, v in _layers(group.cache)])


@dataclass
class _Prefill:
    """Newcomers' prompts going through the model, a chunk of columns per step. With a shared
    prefix the cache starts with its columns, and the rest of each prompt follows, left-padded:
    [prefix][pad..][rest of the prompt]; the mask marks the hole, positions skip it."""

    rows: list[_Row]
    ids: torch.Tensor  # (rows, width), the prompts after the shared prefix, left-padded
    mask: torch.Tensor  # (rows, prefix + width)
    cache: object  # holds the prefix's columns, then the ones prefilled so far
    skip: int = 0  # columns of the shared prefix
    done: int = 0  # columns of `ids` already in the cache


@dataclass
class _Prefix:
    """The keys and values of the beginning many prompts share, for one adapter."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (1, kv_heads, len(ids), head_dim) per layer


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

    def __init__(self, model, pad_id: int | None, prefill_tokens: int = 256, mixed_adapters: bool = False):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id if pad_id is not None else 0
        self.prefill_tokens = prefill_tokens  # prompt tokens (padding included) per step, at most
        self.mixed_adapters = mixed_adapters  # pass each row's adapter name (PEFT LoRA, mixed batch)
        self.max_positions = context_length(model)
        self.keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        self.pending: list[_Row] = []  # admitted, prefill not started
        self.prefills: deque[_Prefill] = deque()
        self.running: _Group | None = None
        self.prefixes: dict[str | None, _Prefix] = {}  # per adapter: the shared beginning of prompts
        self.last_prompt: dict[str | None, list[int]] = {}  # per adapter: the latest prompt prefilled whole
        self.refused: list[Request] = []  # failed at admission, handed back by the next step

    @property
    def size(self) -> int:
        """Requests in the engine: waiting for prefill, prefilling, or decoding."""
        running = len(self.running.rows) if self.running else 0
        return len(self.pending) + sum(len(p.rows) for p in self.prefills) + running

    @property
    def busy(self) -> bool:
        return self.size > 0 or bool(self.refused)

    def admit(self, request: Request, tokenizer, stop_ids: list[int], adapter_name: str | None = None) -> None:
        """Queue a request for the next prefill; one whose settings cannot be used fails at the next step."""
        try:
            if not request.prompt_ids:
                raise ValueError("the prompt is empty")
            self.pending.append(_Row(request, tokenizer, stop_ids, adapter_name, self.max_positions))
        except Exception as err:  # noqa: BLE001 — this request's own settings (e.g. a seed torch refuses)
            request.error, request.finish_reason = err, "error"
            self.refused.append(request)

    def step(self) -> list[Request]:
        refused, self.refused = self.refused, []
        finished: list[_Row] = []
        if self.pending and not self.prefills:
            self._learn_prefixes(self.pending)
            self.prefills.extend(self._start_prefills(self.pending))
            self.pending = []
        if self.prefills:
            finished += self._advance_prefill()
        if self.running is not None:
            finished += self._decode()
        return refused + [row.request for row in finished]

    def abort(self, error: Exception) -> list[Request]:
        """Fail every request still in the engine (the server is stopping)."""
        rows = self.pending + [r for p in self.prefills for r in p.rows] + (self.running.rows if self.running else [])
        for row in rows:
            row.fail(error)
        self.pending, self.prefills, self.running = [], deque(), None
        refused, self.refused = self.refused, []
        return refused + [row.request for row in rows]

    # -- prefill --

    def _learn_prefixes(self, rows: list[_Row]) -> None:
        """Newcomers that begin alike, with no shared prefix known yet for their adapter: read that
        beginning once, as one row, so that they all start after it."""
        by_adapter: dict[str | None, list[_Row]] = {}
        for row in rows:
            if self._shared_prefix(row) is None:
                by_adapter.setdefault(row.adapter_name, []).append(row)
        for adapter, group in by_adapter.items():
            prompts = [row.request.prompt_ids for row in group]
            common = _common_prefix(prompts)[: min(map(len, prompts)) - 1]
            if len(group) < 2 or not MIN_SHARED_PREFIX <= len(common) <= self.prefill_tokens:
                continue
            ids = torch.tensor([common], device=self.device)  # (1, prefix)
            cache = _cache([])
            try:
                self._forward(group[:1], ids, torch.ones_like(ids), torch.arange(len(common), device=self.device)[None],
                              cache)
            except Exception:  # noqa: BLE001, S112 — then the prompts are read whole; one that fails, fails there alone
                continue
            self.prefixes[adapter] = _Prefix(tuple(common), _layers(cache))

    def _start_prefills(self, rows: list[_Row]) -> list[_Prefill]:
        """One prefill per adapter for the rows that begin with its shared prefix, one for the others."""
        groups: dict[object, list[_Row]] = {}
        for row in rows:
            key = row.adapter_name if self._shared_prefix(row) is not None else ("whole prompts",)
            groups.setdefault(key, []).append(row)
        return [self._start_prefill(group) for group in groups.values()]

    def _shared_prefix(self, row: _Row) -> _Prefix | None:
        prefix, prompt = self.prefixes.get(row.adapter_name), row.request.prompt_ids
        if prefix is None or len(prompt) <= len(prefix.ids) or tuple(prompt[:len(prefix.ids)]) != prefix.ids:
            return None
        return prefix

    def _start_prefill(self, rows: list[_Row]) -> _Prefill:
        prefix = self._shared_prefix(rows[0])
        skip = len(prefix.ids) if prefix is not None else 0
        rests = [row.request.prompt_ids[skip:] for row in rows]
        width = max(len(rest) for rest in rests)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), skip + width), dtype=torch.long)
        mask[:, :skip] = 1
        for index, rest in enumerate(rests):
            ids[index, width - len(rest):] = torch.tensor(rest)
            mask[index, skip + width - len(rest):] = 1
        layers = [] if prefix is None else [(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                                            for k, v in prefix.layers]
        return _Prefill(rows, ids.to(self.device), mask.to(self.device), _cache(layers), skip)

    def _advance_prefill(self) -> list[_Row]:
        """The next chunk of the oldest prefill; when its prompts are all in, the first tokens are
        sampled and the rows join the running batch."""
        prefill = self.prefills[0]
        chunk = max(1, self.prefill_tokens // len(prefill.rows))
        end = min(prefill.done + chunk, prefill.ids.shape[1])
        columns = slice(prefill.skip + prefill.done, prefill.skip + end)  # of the mask and the cache
        positions = (prefill.mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift a row's positions
        try:
            logits = self._forward(prefill.rows, prefill.ids[:, prefill.done:end], prefill.mask[:, :columns.stop],
                                   positions[:, columns], prefill.cache)
        except Exception as err:  # noqa: BLE001 — retried one prompt at a time; the one that fails, fails alone
            self.prefills.popleft()
            return self._split_failed_prefill(prefill, err)
        prefill.done = end
        if end < prefill.ids.shape[1]:
            return []
        self.prefills.popleft()
        group = _Group(prefill.rows, prefill.cache, prefill.mask)
        if prefill.skip == 0:
            self._remember_prefix(group)
        finished = self._take_tokens(group, logits)
        kept = [slot for slot, row in enumerate(group.rows) if not row.done]
        if kept:
            group = group if len(kept) == len(group.rows) else _select(group, kept)
            self.running = _merge([self.running, group]) if self.running is not None else group
        return finished

    def _remember_prefix(self, group: _Group) -> None:
        """Keep the keys and values of what these prompts (and the one before) begin with, when it is
        long enough to be worth it; it replaces a prefix they did not share."""
        adapter = group.rows[0].adapter_name
        if any(row.adapter_name != adapter for row in group.rows):
            return
        prompts = [row.request.prompt_ids for row in group.rows]
        previous = self.last_prompt.get(adapter)
        self.last_prompt[adapter] = prompts[-1]
        common = _common_prefix(prompts + ([previous] if previous else []))[: min(map(len, prompts)) - 1]
        if len(common) < MIN_SHARED_PREFIX:
            return
        columns = group.mask[0].nonzero().flatten()[: len(common)]  # row 0's first real tokens
        layers = [(k[:1, :, columns], v[:1, :, columns]) for k, v in _layers(group.cache)]
        self.prefixes[adapter] = _Prefix(tuple(common), layers)

    def _split_failed_prefill(self, prefill: _Prefill, error: Exception) -> list[_Row]:
        if len(prefill.rows) == 1:
            prefill.rows[0].fail(error)
            return prefill.rows
        for row in reversed(prefill.rows):
            self.prefills.appendleft(self._start_prefill([row]))
        return []

    # -- decode --

    def _decode(self) -> list[_Row]:
        """Feed every running row its last token; drop the rows that finish."""
        outcomes, failed = self._feed(self.running)
        finished = list(failed)
        for group, logits in outcomes:
            finished += self._take_tokens(group, logits)
        groups = [group for group, _ in outcomes]
        rows = [row for group in groups for row in group.rows]
        if not rows:
            self.running = None
            return finished
        group = _merge(groups)  # after a failure: the halves that went on, together again
        kept = [slot for slot, row in enumerate(rows) if not row.done]
        self.running = (group if len(kept) == len(rows) else _select(group, kept)) if kept else None
        return finished

    def _feed(self, group: _Group) -> tuple[list[tuple[_Group, torch.Tensor]], list[_Row]]:
        """One decode forward pass of `group`: [(group, logits (rows, vocab))] and the rows that failed.
        When the pass raises, it is undone and the halves are fed apart, down to the row that fails."""
        tokens = torch.tensor([[row.next_token] for row in group.rows], device=self.device)  # (rows, 1)
        positions = group.mask.sum(-1, keepdim=True)  # (rows, 1): real tokens before this one
        mask = torch.cat([group.mask, group.mask.new_ones((len(group.rows), 1))], dim=1)
        try:
            logits = self._forward(group.rows, tokens, mask, positions, group.cache)
        except Exception as err:  # noqa: BLE001 — find the offending row; the others must go on
            _crop(group)
            if len(group.rows) == 1:
                group.rows[0].fail(err)
                return [], group.rows
            half = len(group.rows) // 2
            first = self._feed(_select(group, list(range(half))))
            second = self._feed(_select(group, list(range(half, len(group.rows)))))
            return first[0] + second[0], first[1] + second[1]
        group.mask = mask
        return [(group, logits)], []

    def _forward(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache) -> torch.Tensor:
        """Logits of the last column, (rows, vocab) fp32; `cache` takes the new columns."""
        per_row = {"adapter_names": [row.adapter_name for row in rows]} if self.mixed_adapters else {}
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, **self.keep_last, **per_row)
        return output.logits[:, -1, :].float()

    def _take_tokens(self, group: _Group, logits: torch.Tensor) -> list[_Row]:
        """Each row takes its next token; an error in one row's sampling or callback fails that row."""
        finished = []
        for row, token in zip(group.rows, _choose_tokens(group.rows, logits)):
            try:
                if isinstance(token, Exception):
                    raise token
                row.take(token)
            except Exception as err:  # noqa: BLE001 — this request's own failure
                row.fail(err)
            if row.done:
                finished.append(row)
        return finished


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def decode(model, tokenizer, requests: list[Request], stop_ids: list[int], pad_id: int,
           adapter_names: list[str] | None = None, batch_size: int | None = None,
           on_finished: Callable[[Request], None] | None = None, prefill_tokens: int = 256) -> None:
    """Run the requests to completion, at most `batch_size` at a time (all by default), a new one
    joining as soon as one finishes; results land in each Request. `adapter_names` (one per request,
    "__base__" for none) runs a PEFT LoRA model with a different adapter per row. The first error of
    a request is raised once the others are done."""
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
