"""One process at a time for work that several may start at once on one machine: the ranks of a
`train.devices` / torchrun run all prepare the same data folder and convert the same GGUF into the
cache. The first to take the lock does the work; the others wait, then find it done and reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def lock_file(target: Path) -> Path:
    """The lock of `target`, kept in the tunesmith cache so that waiting never creates the target's
    own folder (a run directory must not appear before its data is known to be good)."""
    from tunesmith.model.load import cache_root

    name = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:20]
    return cache_root() / "locks" / f"{name}.lock"


@contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold the lock of `target` (a folder or file being made) while the block runs."""
    lock_path = lock_file(target)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


TRAINING_LOCK = ".training.lock"  # in the run directory, with the training process's pid


@contextmanager
def training(run_dir: Path) -> Iterator[None]:
    """Held by the process training `run_dir` (the kernel lets go if it dies): `training_pid` tells a
    running run from an interrupted one, and which process to send Ctrl-C's signal to."""
    descriptor = os.open(run_dir / TRAINING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def training_pid(run_dir: Path) -> int | None:
    """The pid of the process training `run_dir` now (0 if it is unreadable), or None if none is."""
    path = run_dir / TRAINING_LOCK
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # several readers may look at once
    except BlockingIOError:
        text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)
