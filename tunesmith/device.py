"""Which device and which precision a run uses, decided once and said out loud."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (avx512_bf16 or AMX): ~5x faster than fp32 here."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            from tunesmith.log import say

            say("Warning: this CPU has no native bf16 (avx512_bf16 or AMX); bf16 maths will be far "
                "slower than fp32 here. precision: auto picks the fast one.")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32
