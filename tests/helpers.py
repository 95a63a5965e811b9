"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tiny

REPO = Path(__file__).resolve().parent.parent
# The user's cache as it was before conftest pointed TUNESMITH_CACHE at a private folder.
REAL_CACHE = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def qa_rows(count: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i} plus one?", "answer": f"{i + 1}"} for i in range(start, start + count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return tiny.write_jsonl(path, rows)


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_subprocess(*args, timeout: float = 300) -> CliResult:
    """Run `python -m tunesmith ARGS` as a real process, as a user would."""
    command = [sys.executable, "-m", "tunesmith", *map(str, args)]
    process = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout, cwd=REPO,
                             env=dict(os.environ))
    return CliResult(process.returncode, process.stdout, process.stderr)


def fast_train_flags(max_steps: int = 2, batch: int = 2, micro: int = 2) -> list[str]:
    """Flags that keep a tiny run to a second: few steps, fp32 on the CPU, no warmup."""
    return ["--train.max_steps", max_steps, "--train.batch_size", batch, "--train.micro_batch_size", micro,
            "--train.warmup_steps", 0, "--train.eval_interval", 0, "--train.eval_iters", 2,
            "--train.precision", "fp32", "--train.device", "cpu", "--train.log_interval", 1]
