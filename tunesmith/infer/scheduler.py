"""A bounded queue of generation jobs and the one thread that decodes them, continuously batched.

Requests from any number of clients wait here. The decoding thread serves one model at a time:
it starts with the model of the oldest waiting job and, between any two decode steps, lets in
every waiting job that can share that batch (up to `max_batch_size` rows), so a new request starts
at the next step instead of waiting for the batch to end. Jobs share a batch when they are for the
same served model, or for plain LoRA adapters of one shared base (and that base itself): PEFT then
applies each row's own adapter. When the oldest waiting job needs another model, nobody new joins
and the batch drains; then that model gets its turn, so no model's requests starve another's.

The queue has a fixed size: a job that does not fit is refused at once (the server answers 429)
rather than held in memory without bound. A job's own failure reaches only its `on_done`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from tunesmith.infer.engine import PROMPT_CACHE_BYTES, Engine, Request
from tunesmith.infer.generate import stop_token_ids
from tunesmith.infer.registry import Served
from tunesmith.log import say


class QueueFull(Exception):
    """More jobs are waiting than the queue holds."""


class ServerStopping(Exception):
    """The server stopped before the job was finished."""


@dataclass
class Job:
    served: Served
    request: Request
    on_done: Callable[[BaseException | None], None]  # called once, from the decoding thread
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, max_batch_size: int = 8, max_queue: int = 64, prefill_tokens: int = 256,
                 prompt_cache_bytes: int = PROMPT_CACHE_BYTES):
        self.max_batch_size = max_batch_size  # rows decoded together, at most
        self.max_queue = max_queue  # jobs waiting to join, at most
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled per decode step, at most
        self.prompt_cache_bytes = prompt_cache_bytes  # per engine: what finished requests held (prompt_cache.py)
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tunesmith-decode", daemon=True)
        self._engines: dict[str, Engine] = {}  # per batch key, kept between runs: its prompt cache lives on
        self.batches = 0  # runs of one model from an empty engine to an empty engine, for the log
        self.largest_batch = 0  # most rows decoded together

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def prompt_cache_use(self) -> tuple[int, int]:
        """Prompts that began with cached keys and values, and the tokens they did not read again."""
        engines = list(self._engines.values())
        return sum(e.prompts.hits for e in engines), sum(e.prompts.tokens_reused for e in engines)

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of the jobs or, when they do not all fit, none of them (QueueFull)."""
        with self._condition:
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_queue})")
            self._waiting.extend(jobs)
            self._condition.notify()

    def _next_model(self) -> Served | None:
        """The model of the oldest waiting job, once there is one (None: stopping)."""
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            return None if self._stopping else self._waiting[0].served

    def _admit(self, key: str, room: int) -> list[Job]:
        """Waiting jobs that may join a batch of `key`, oldest first; none while an older job needs
        another model (the batch drains for it)."""
        with self._condition:
            if self._stopping or not self._waiting or self._waiting[0].served.batch_key != key:
                return []
            taken = [job for job in self._waiting if job.served.batch_key == key][:max(room, 0)]
            for job in taken:
                self._waiting.remove(job)
            return taken

    def _loop(self) -> None:
        while (served := self._next_model()) is not None:
            jobs: dict[int, Job] = {}
            try:
                self._serve(served, jobs)
            except Exception as err:  # noqa: BLE001 — an engine bug fails this batch's jobs; the server lives on
                say(f"Decoding failed: {type(err).__name__}: {err}")
                self._engines.pop(served.batch_key, None)  # start the next run from a fresh engine
                for job in jobs.values():
                    _notify(job, err)
            self.batches += 1

    def _serve(self, first: Served, jobs: dict[int, Job]) -> None:
        """Decode `first`'s model until its engine is empty; matching jobs join between steps."""
        mixed = first.mixed_batches
        engine = self._engines.get(first.batch_key)
        if engine is None:
            engine = Engine(first.loaded.model, first.loaded.tokenizer.pad_token_id, self.prefill_tokens, mixed,
                            self.prompt_cache_bytes)
            self._engines[first.batch_key] = engine
        with nullcontext() if mixed else first.activate():
            while True:
                for job in self._admit(first.batch_key, self.max_batch_size - engine.size):
                    jobs[id(job.request)] = job
                    engine.admit(job.request, job.served.loaded.tokenizer, stop_token_ids(job.served.loaded),
                                 job.served.peft_name if mixed else None)
                if self._stopping:
                    finished = engine.abort(ServerStopping("the server is stopping"))
                elif not engine.busy:
                    return
                else:
                    self.largest_batch = max(self.largest_batch, engine.size)
                    finished = engine.step()
                for request in finished:
                    job = jobs.pop(id(request))
                    _notify(job, request.error)
                if self._stopping:
                    return


def _notify(job: Job, error: BaseException | None) -> None:
    try:
        job.on_done(error)
    except Exception as err:  # noqa: BLE001 — a callback's failure must not stop the decoding thread
        say(f"A request's completion callback failed: {err}")
