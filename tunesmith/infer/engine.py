"""The token loop behind `chat` and `serve`: several requests decoded together, each with its own
sampling settings, its text handed out piece by piece as it is produced.

transformers' `generate` applies one set of sampling settings to a whole batch and cannot drop a
finished row, so a server batching strangers' requests needs its own loop. It is the plain one:

    prefill   all prompts, left-padded, in one forward pass that fills the KV cache
    decode    one token per live row per pass; a row that stops (end of turn, a stop string,
              max_new_tokens, or a cancelled request) leaves the batch and the cache at once

Sampling mirrors transformers' order (repetition penalty, temperature, top-k, top-p), so greedy
decoding here gives exactly what `model.generate` gives; tests/test_serve.py checks that.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (the most likely token every time)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 = no limit
    repetition_penalty: float = 1.0  # > 1 makes tokens already in prompt or answer less likely
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    seed: int | None = None  # fixes the sampled tokens of one request

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
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be positive")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
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
    finish_reason: str | None = None  # stop | length | cancelled


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow (None: not stated)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Row:
    """One request while it decodes: its tokens, its text so far, what has been handed out."""

    def __init__(self, request: Request, stop_ids: set[int]):
        self.request = request
        self.stop_ids = stop_ids
        self.seen = set(request.prompt_ids)  # for the repetition penalty
        self.emitted = 0  # characters of text already handed to on_text
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (vocab,), fp32."""
        sampling = self.request.sampling
        if sampling.repetition_penalty != 1.0 and self.seen:
            index = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[index]
            logits = logits.clone()
            logits[index] = torch.where(picked < 0, picked * sampling.repetition_penalty,
                                        picked / sampling.repetition_penalty)
        if sampling.temperature == 0.0:
            return int(logits.argmax())
        logits = logits / sampling.temperature
        if 0 < sampling.top_k < logits.numel():
            kth = torch.topk(logits, sampling.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sampling.top_p < 1.0:
            logits = _top_p(logits, sampling.top_p)
        probabilities = torch.softmax(logits, dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=self.generator))

    def add(self, token: int, tokenizer) -> bool:
        """Record a token; True when the request is finished."""
        request = self.request
        if token in self.stop_ids:
            return self._finish("stop")
        request.completion_ids.append(token)
        self.seen.add(token)
        text = tokenizer.decode(request.completion_ids, skip_special_tokens=True)
        cut = _first_stop(text, request.sampling.stop)
        if cut is not None:
            request.text = text[:cut]
            return self._finish("stop")
        request.text = text
        if len(request.completion_ids) >= request.sampling.max_new_tokens:
            return self._finish("length")
        self._emit(_safe_end(text, request.sampling.stop))
        return False

    def _finish(self, reason: str) -> bool:
        self.request.finish_reason = reason
        self._emit(len(self.request.text))
        return True

    def _emit(self, end: int) -> None:
        if end > self.emitted and self.request.on_text is not None:
            self.request.on_text(self.request.text[self.emitted:end])
        self.emitted = max(self.emitted, end)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
    drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # the mass before this token already suffices
    drop[0] = False  # the most likely token always stays
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s in text]
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


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def decode(model, tokenizer, requests: list[Request], stop_ids: list[int], pad_id: int,
           adapter_names: list[str] | None = None) -> None:
    """Run the requests to completion together; results land in each Request. `adapter_names`
    (one per request, "__base__" for none) runs a PEFT LoRA model with a different adapter per row."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    rows = [_Row(r, set(stop_ids)) for r in requests]
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, request in enumerate(requests):
        input_ids[index, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
        mask[index, width - len(request.prompt_ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)  # (batch, width), left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift a row's positions
    cache = DynamicCache(config=model.config)
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    names = list(adapter_names) if adapter_names is not None else None
    live = list(range(len(rows)))  # rows still decoding, in the cache's batch order
    step_ids, step_positions = input_ids, positions
    while live:
        per_row = {"adapter_names": [names[row] for row in live]} if names is not None else {}
        output = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                       past_key_values=cache, use_cache=True, **keep_last, **per_row)
        logits = output.logits[:, -1, :].float()  # (live, vocab)
        tokens, kept = [], []
        for slot, row_index in enumerate(live):
            row = rows[row_index]
            token = row.choose(logits[slot])
            if row.request.cancelled:
                row._finish("cancelled")
            elif not row.add(token, tokenizer):
                tokens.append(token)
                kept.append(slot)
        if len(kept) < len(live):  # finished rows leave the batch and the cache
            if not kept:
                break
            index = torch.tensor(kept, device=device)
            cache.batch_select_indices(index)
            mask, step_positions = mask[index], step_positions[index]
            live = [live[slot] for slot in kept]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        step_positions = step_positions[:, -1:] + 1  # (live, 1)
        step_ids = torch.tensor(tokens, device=device).unsqueeze(1)  # (live, 1)
