"""One request as the engine (engine.py) decodes it: its settings (Sampling), what the caller
gets back (Request), and while it runs (Row) how its next token is chosen (transformers' logits
processors with the request's own generator) and how its text grows (incremental detokenization,
stop strings held back until they can no longer match).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_SEED = 2**63 - 1  # a torch.Generator seed is a 64-bit integer; OpenAI clients send int64
# top-p sampling looks at this many of the most likely tokens first; only when they hold less than
# top_p of the probability is the whole vocabulary sorted (49k tokens x rows: the slowest part of a step)
NUCLEUS_CANDIDATES = 256
# Dividing logits by a temperature (or a repetition penalty) this small overflows them to inf and the
# probabilities to NaN; a positive temperature below it decodes greedily, its limit (as vLLM does).
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01


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
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty >= MIN_REPETITION_PENALTY):
            problems.append(f"repetition_penalty={self.repetition_penalty} must be a number of at least "
                            f"{MIN_REPETITION_PENALTY} (1 = no penalty)")
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
    # evaluate's test loss: tokens that follow the prompt (the reference answer) read in the prompt's own
    # prefill, so their log-likelihood costs no second pass; they are not part of the answer
    score_ids: list[int] = field(default_factory=list)
    score_counted: list[bool] = field(default_factory=list)  # which score_ids count (empty: all)
    score_logprob: float = 0.0  # filled in: summed log p of the counted score_ids
    score_count: int = 0


class Sampler:
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

        self.greedy = sampling.temperature < GREEDY_BELOW_TEMPERATURE
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

    def choose(self, samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
        """The next tokens of rows with this sampler's settings, from their logits (rows, vocab), fp32;
        each row draws with its own generator."""
        if self.shares_warpers and not self.greedy and self.sampling.top_p < 1.0:
            found = nucleus(logits / self.sampling.temperature, self.sampling.top_k, self.sampling.top_p)
            if found is not None:
                ids, weights = found  # (rows, candidates) each
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


def nucleus(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def choose_tokens(rows: list[Row], logits: torch.Tensor) -> list[int | Exception]:
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
            chosen = [choose_one(rows[s], logits[s: s + 1]) for s in slots]
        for slot, token in zip(slots, chosen):
            tokens[slot] = token
    return tokens


def choose_one(row: Row, logits: torch.Tensor) -> int | Exception:
    try:
        return row.sampler.choose([row.sampler], logits)[0]
    except Exception as err:  # noqa: BLE001 — returned to fail this row only
        return err


def text_stream(tokenizer) -> Callable[[int], str]:
    """A function from the next token to the text it adds (maybe "" while a character is incomplete).
    The tokenizers library's DecodeStream does constant work per token; tokenizers without a Rust
    backend, or that clean up spaces after decoding, use the window method of vLLM/TGI."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(backend, token) or ""
    return WindowDecoder(tokenizer).step


class WindowDecoder:
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


class Row:
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
        self.sampler = Sampler(request.sampling, request.prompt_ids)
        self.next_text = text_stream(tokenizer)

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
            cut = first_stop(self.streamed, request.sampling.stop, len(self.streamed) - len(piece))
            if cut is not None:
                return self.finish("stop", self.streamed[:cut])
        request.text = self.streamed
        if len(request.completion_ids) >= request.sampling.max_new_tokens or self._context_full():
            return self.finish("length")
        self._emit(safe_end(self.streamed, request.sampling.stop))

    def _context_full(self) -> bool:
        used = len(self.request.prompt_ids) + len(self.request.completion_ids)
        return self.max_positions is not None and used >= self.max_positions

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the request; its text is decoded once, whole, so that it is exactly what the
        tokenizer's decode gives (the stream may still hold back the bytes of a last character)."""
        if text is None:
            whole = self.tokenizer.decode(self.request.completion_ids, skip_special_tokens=True)
            text = whole if whole.startswith(self.streamed) else self.streamed
            cut = first_stop(text, self.request.sampling.stop, len(self.streamed))
            text, reason = (text, reason) if cut is None else (text[:cut], "stop")
        self.request.text, self.request.finish_reason, self.done = text, reason, True
        self._emit(len(text))

    def fail(self, error: Exception) -> None:
        self.request.error, self.request.finish_reason, self.done = error, "error", True

    def _emit(self, end: int) -> None:
        if end > self.emitted and self.request.on_text is not None:
            self.request.on_text(self.request.text[self.emitted:end])
        self.emitted = max(self.emitted, end)


def first_stop(text: str, stops: tuple[str, ...], new_from: int = 0) -> int | None:
    """Where the first stop string starts, looking only where text from `new_from` on could complete one."""
    found = [text.find(s, max(0, new_from - len(s) + 1)) for s in stops]
    found = [index for index in found if index >= 0]
    return min(found) if found else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
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
