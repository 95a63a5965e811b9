"""Answers streamed from a run's base model and its tuned one, side by side for the same prompt:
both loaded as `tunesmith chat` loads them (the run's own template), kept while in use. Each side
continues its own conversation: the page sends the earlier turns with that side's own answers,
and each model's engine keeps what it read (its prompt cache), so a next turn reads only the new
message."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from tunesmith.infer.chat import Conversation
from tunesmith.infer.engine import Engine
from tunesmith.infer.generate import Loaded, load_base, load_run, stop_token_ids
from tunesmith.infer.request import Request, Sampling

KEEP_MODELS = 2  # a base and a tuned model in memory; a third evicts the oldest
DONE = object()


class Models:
    def __init__(self):
        self.loaded: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self.locks: dict[tuple[str, str], threading.Lock] = {}
        # one engine per loaded model, kept between answers: its prompt cache holds the conversations
        # so far, so a next turn reads only the new message (used under the model's lock)
        self.engines: dict[tuple[str, str], Engine] = {}
        self.guard = threading.Lock()

    def engine(self, folder: Path, side: str, loaded: Loaded, fresh: bool = False) -> Engine:
        """The model's engine (a new one with `fresh`: the last answer failed half-way through a step)."""
        key = (str(folder), side)
        with self.guard:
            engine = self.engines.get(key)
            if fresh or engine is None or engine.model is not loaded.model:
                engine = self.engines[key] = Engine(loaded.model, loaded.tokenizer.pad_token_id)
            return engine

    def get(self, folder: Path, side: str) -> tuple[Loaded, threading.Lock]:
        key = (str(folder), side)
        with self.guard:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:  # one load per model, however many pages ask at once
            with self.guard:
                if key in self.loaded:
                    self.loaded.move_to_end(key)
                    return self.loaded[key], lock
            loaded = _load(folder, side)
            with self.guard:
                self.loaded[key] = loaded
                while len(self.loaded) > KEEP_MODELS:
                    self.engines.pop(self.loaded.popitem(last=False)[0], None)
        return loaded, lock


def _load(folder: Path, side: str) -> Loaded:
    from tunesmith import config as config_module

    if side == "tuned":
        return load_run(folder, device="cpu")
    run_config = config_module.load(folder / "config.yaml")
    return load_base(run_config.model, run_config.data.template, run_config.data.system_prompt, device="cpu")


def stream(models: Models, folder: Path, side: str, history: list[dict], prompt: str,
           sampling: Sampling) -> tuple[Iterator[str], int] | None:
    """Load the model now (its errors are the caller's); then the answer's pieces as they are
    decoded, and how many of the oldest turns were left out to fit the model's context, as
    `tunesmith chat` does. None when the message alone does not fit. Closing the iterator (the
    page went away) stops the answer."""
    loaded, lock = models.get(folder, side)
    conversation = Conversation(loaded, None, sampling.max_new_tokens)
    conversation.messages = [*conversation.start, *history]
    prompt_ids = conversation.prompt_ids(prompt)
    if prompt_ids is None:
        return None
    engine = partial(models.engine, folder, side, loaded)
    return _pieces(loaded, lock, Request(prompt_ids, sampling), engine), conversation.dropped


def _pieces(loaded: Loaded, lock: threading.Lock, request: Request,
            engine: Callable[..., Engine] | None = None) -> Iterator[str]:
    pieces: queue.Queue = queue.Queue()
    request.on_text = pieces.put

    def work() -> None:
        from tunesmith.infer.engine import decode

        with lock:  # one answer at a time per model; the other side runs beside it
            try:
                decode(loaded.model, loaded.tokenizer, [request], stop_token_ids(loaded),
                       loaded.tokenizer.pad_token_id, engine=engine() if engine else None)
            except Exception as err:  # noqa: BLE001 — shown to the page as this answer's error
                pieces.put(f"\n[error: {err}]")
                if engine:
                    engine(fresh=True)  # the failed one may have stopped half-way through a step
        pieces.put(DONE)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (piece := pieces.get()) is not DONE:
            yield piece
    finally:
        request.cancelled = True
