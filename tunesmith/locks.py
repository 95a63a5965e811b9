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
