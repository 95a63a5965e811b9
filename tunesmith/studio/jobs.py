"""Work the studio starts: the CLI itself (`python -m tunesmith VERB ...`) as a separate process, so
that the page can close and reopen without touching it. Each job is a JSON record and a log under
<runs>/.studio/jobs/, so every page (and a restarted studio) sees the same state."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith import locks

LOG_TAIL_LINES = 40
# Exit codes that are not failures: done, or stopped by Stop / Ctrl-C (130: after its checkpoint;
# -SIGINT / -SIGTERM: before training began, nothing to save)
STOPPED_BY_USER = (0, 130, -signal.SIGINT, -signal.SIGTERM)


@dataclass
class Job:
    id: str
    verb: str
    run: str  # the run directory's name under the runs folder
    args: list[str]
    command: str  # what a user would type for the same work
    pid: int
    started: float
    exit_code: int | None = None
    error: str | None = None  # the CLI's one-line error, when it failed
    ended: float | None = None
    extra: dict = field(default_factory=dict)


class Jobs:
    def __init__(self, root: Path, here: Path):
        self.root = root
        self.here = here  # where the studio was started: jobs run there, as if typed in that terminal
        self.folder = root / ".studio" / "jobs"
        self.lock = threading.Lock()

    def start(self, verb: str, run: str, args: list[str]) -> Job:
        self.folder.mkdir(parents=True, exist_ok=True)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        log = (self.folder / f"{job_id}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen([sys.executable, "-m", "tunesmith", verb, *args], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.here,
                                   env=env, start_new_session=True)  # its own group: Stop reaches torchrun's ranks
        log.close()
        job = Job(job_id, verb, run, args, "tunesmith " + shlex.join([verb, *args]), process.pid, time.time())
        self.save(job)
        threading.Thread(target=self._wait, args=(process, job), daemon=True).start()
        return job

    def _wait(self, process: subprocess.Popen, job: Job) -> None:
        # Wait without reaping: the process stays a zombie of ours, which alive() counts as running,
        # until its exit is on disk; a page never sees it neither running nor ended.
        ended = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        job.exit_code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
        job.ended = time.time()
        if job.exit_code not in STOPPED_BY_USER:
            job.error = self.error_line(job) or f"exited with code {job.exit_code}"
        self.save(job)
        process.wait()

    def save(self, job: Job) -> None:
        with self.lock:
            tmp = self.folder / f".{job.id}.json.tmp"
            tmp.write_text(json.dumps(asdict(job)))
            os.replace(tmp, self.folder / f"{job.id}.json")

    def all(self) -> list[Job]:
        jobs = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                jobs.append(Job(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a record another studio is replacing, or not ours
        return jobs

    def get(self, job_id: str) -> Job | None:
        return next((job for job in self.all() if job.id == job_id), None)

    def latest(self, run: str, verb: str | None = None) -> Job | None:
        matching = [job for job in self.all() if job.run == run and (verb is None or job.verb == verb)]
        return max(matching, key=lambda job: job.started) if matching else None

    def log_tail(self, job: Job, lines: int = LOG_TAIL_LINES) -> str:
        path = self.folder / f"{job.id}.log"
        try:
            text = path.read_bytes()[-20000:].decode(errors="replace")
        except OSError:
            return ""
        text = text.replace("\r", "\n")  # progress bars redraw one line with carriage returns
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def error_line(self, job: Job) -> str | None:
        errors = [line for line in self.log_tail(job, 200).splitlines() if line.startswith("tunesmith: ")]
        return errors[-1].removeprefix("tunesmith: ") if errors else None


def alive(job: Job) -> bool:
    """Still running: no exit recorded and the process exists (a studio restarted since cannot
    record the exit of a job it did not start, so the process table decides). A zombie is running
    while it is our own child (its exit is being recorded), ended when it is anyone else's."""
    if job.exit_code is not None:
        return False
    try:
        state, parent = Path(f"/proc/{job.pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return False
    return state != "Z" or int(parent) == os.getpid()


def stop(job: Job | None, run_dir: Path) -> bool:
    """Ctrl-C's signal to whatever trains `run_dir`: the studio's job (its whole process group) or
    a `tunesmith finetune` started in a terminal. The run saves a checkpoint and exits."""
    if job is not None and alive(job):
        with contextlib.suppress(ProcessLookupError):  # it ended a moment ago
            os.killpg(job.pid, signal.SIGINT)
        return True
    pid = locks.training_pid(run_dir)
    if pid:
        os.kill(pid, signal.SIGINT)
        return True
    return False
