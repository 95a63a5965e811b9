"""Host memory that is freed goes back to the operating system.

glibc's malloc serves large blocks with mmap (returned on free) only above a threshold that it
raises each time such a block is freed, up to 32 MiB. A training step frees and reallocates
activations of a few MiB each, so after the first step they come from the heap, which keeps
freed memory and fragments: on SmolLM2-135M LoRA (micro batch 4 x 256 tokens) the resident size
grew by ~1 GiB per step over the ~3.2 GiB the step needs. Pinning the threshold at 128 KiB keeps
the resident size at what the step holds, and measured no slower.
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
