"""What the side-by-side benches share: each run in a child process of its own, measured from outside
(wall time, its own peak RSS and CPU time from wait4), the error a failed child died of, the CPU model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@dataclass
class ChildRun:
    returncode: int
    wall_seconds: float
    peak_bytes: int  # the child's own peak resident set
    cpu_seconds: float  # the child's own user + system time


def run_measured(command: list[str], log_path: Path, cwd: Path, timeout_seconds: float) -> ChildRun:
    """Run `command` offline with its output in log_path; SIGKILL it after timeout_seconds."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV},
                                 cwd=str(cwd))
        killer = threading.Timer(timeout_seconds, lambda: os.kill(child.pid, signal.SIGKILL))
        killer.start()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS alone
        killer.cancel()
    return ChildRun(os.waitstatus_to_exitcode(status), time.perf_counter() - started,
                    usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)  # ru_maxrss is in KiB on Linux


def last_error(log_path: Path, code: int) -> str:
    """The exception line of the child's traceback (or its last line), for a results table."""
    if code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)]
    return f"exit {code}: {(raised or lines or ['no output'])[-1][:240]}"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"
