"""train.compact_memory: freed host memory goes back to the operating system at once.

glibc's malloc serves large blocks with mmap (returned on free) only above a threshold that it
raises each time such a block is freed, up to 32 MiB. A training step frees and reallocates
activations of a few MiB each, so after the first steps they come from the heap, which keeps
what was freed for reuse: the resident size climbs for a few steps to a high-water mark ~1.3-1.5x
what one step holds, then stays there (it is reuse, not a leak). Pinning the threshold at 128 KiB
keeps the resident size at what the step holds, but every activation then costs fresh, zeroed
pages from the kernel: on SmolLM2-135M LoRA steps ran ~40% slower (71 vs 120 tok/s). So it is
opt-in, for a run that would not otherwise fit in RAM; bench/RESULTS.md has both, side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory_to_os() -> bool:
    """Pin glibc's mmap threshold; False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
