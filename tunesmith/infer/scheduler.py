"""A bounded queue of generation jobs and the one thread that decodes them in batches.

Requests from any number of clients wait here. The decoding thread takes the oldest waiting job
and, with it, up to `max_batch_size - 1` more that can share its batch, decodes them together,
and starts over. Jobs share a batch when they are for the same served model, or for plain LoRA
adapters of one shared base (and that base itself): PEFT then applies each row's own adapter.
Oldest first means no model's requests starve another's. The queue has a fixed size: a job that does not fit is refused at
once (the server answers 429) rather than held in memory without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tunesmith.infer.engine import Request, decode
from tunesmith.infer.generate import stop_token_ids
from tunesmith.infer.registry import Served


class QueueFull(Exception):
    """More jobs are waiting than the queue holds."""


@dataclass
class Job:
    served: Served
    request: Request
    on_done: Callable[[BaseException | None], None]  # called once, from the decoding thread
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, max_batch_size: int = 8, max_queue: int = 64):
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tunesmith-decode", daemon=True)
        self.batches = 0  # decoded so far, for /health and the log
        self.largest_batch = 0

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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

    def _take_batch(self) -> list[Job] | None:
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            key = self._waiting[0].served.batch_key
            batch = [job for job in self._waiting if job.served.batch_key == key][: self.max_batch_size]
            for job in batch:
                self._waiting.remove(job)
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [job for job in batch if not job.request.cancelled]
            error = None
            if live:
                try:
                    self._decode(live)
                except Exception as err:  # noqa: BLE001 — a failed batch answers its clients with 500; the server lives on
                    error = err
            for job in batch:
                job.on_done(error)

    def _decode(self, jobs: list[Job]) -> None:
        served = jobs[0].served
        loaded = served.loaded
        requests = [job.request for job in jobs]
        if served.mixed_batches:  # one batch, each row with its own adapter
            decode(loaded.model, loaded.tokenizer, requests, stop_token_ids(loaded), loaded.tokenizer.pad_token_id,
                   [job.served.peft_name for job in jobs])
        else:
            with served.activate():
                decode(loaded.model, loaded.tokenizer, requests, stop_token_ids(loaded), loaded.tokenizer.pad_token_id)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
