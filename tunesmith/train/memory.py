"""How glibc's malloc hands freed host memory back: at once (train.compact_memory), or kept for the
next allocation (generation on a CPU).

glibc serves large blocks with mmap (returned on free) only above a threshold that it raises each
time such a block is freed, up to 32 MiB, and it trims the top of its heap once more than twice that
is free there. A training step frees and reallocates activations of a few MiB each, so after the
first steps they come from the heap, which keeps what was freed for reuse: the resident size climbs
for a few steps to a high-water mark ~1.3-1.5x what one step holds, then stays there (it is reuse,
not a leak). Pinning the threshold at 128 KiB keeps the resident size at what the step holds, but
every activation then costs fresh, zeroed pages from the kernel: on SmolLM2-135M LoRA steps ran
~40% slower (71 vs 120 tok/s). So that is opt-in, for a run that would not otherwise fit in RAM;
bench/RESULTS.md has both, side by side.

Generation's passes are the opposite case: a prefill of 240 rows x 17 columns allocates blocks of
~25 MiB, and between them the heap's free top is trimmed, so each pass took ~900,000 fresh pages
from the kernel (~2.6 us each on these virtual machines: seconds per pass). `keep_freed_memory`
pins the threshold at its 32 MiB ceiling and trims only past 1 GiB, so those blocks are reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024
KEEP_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's ceiling on 64-bit machines
KEEP_TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
_compacting = False  # train.compact_memory asked for the opposite: keep_freed_memory leaves it


@cache
def _mallopt():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: no mallopt
        return None


def return_freed_memory_to_os() -> bool:
    """Pin glibc's mmap threshold low; False (and nothing changed) where the C library is not glibc."""
    global _compacting
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _compacting = True
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB for reuse; False (nothing changed) without glibc or after
    return_freed_memory_to_os."""
    mallopt = _mallopt()
    if mallopt is None or _compacting:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD_BYTES))
