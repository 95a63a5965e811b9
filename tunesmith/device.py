"""Which device and which precision a run uses, decided once and said out loud."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from tunesmith.errors import ConfigError


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:  # torch's "Invalid device string"
        raise ConfigError(f"device {requested!r} is not a device: auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                          "that torch can use; use auto or cpu")
    return device


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU has bf16 instructions (avx512_bf16 or AMX). Having them is not enough for
    bf16 to be fast: see cpu_bf16_pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


BF16_MARGIN = 1.1  # bf16 must multiply this much faster than fp32 for precision auto to take it on a CPU


def cpu_bf16_pays() -> bool:
    """bf16 is the faster precision on this CPU: it has the instructions and a measured bf16 matmul
    beats fp32 (cached per machine). With AMX bf16 runs several times faster than fp32; with
    avx512_bf16 alone it measured about half fp32's speed on an Intel Xeon and 2.2x on an AMD EPYC
    (2 threads)."""
    if not cpu_has_bf16():
        return False
    from tunesmith.train.flops import cached_peak_flops

    cpu = torch.device("cpu")
    return cached_peak_flops(cpu, torch.bfloat16) > BF16_MARGIN * cached_peak_flops(cpu, torch.float32)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            from tunesmith.log import say

            say("Warning: this CPU has no native bf16 (avx512_bf16 or AMX); bf16 maths will be far "
                "slower than fp32 here. precision: auto picks the fast one.")
        elif device.type == "cpu" and not cpu_bf16_pays():
            from tunesmith.log import say

            say("Note: on this CPU a bf16 matmul measures slower than fp32 (bf16 instructions without AMX); "
                "bf16 halves the frozen weights' memory but trains slower. precision: auto picks fp32 here.")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16_pays() else torch.float32


BUSY_SHARE = 0.75  # load average at or above this share of the cores: other work is using the CPU


def use_threads(threads: int | None, device: torch.device | str = "cpu") -> int:
    """Set the CPU threads for the maths (None: torch's choice, one per core) and warn when other work is
    already using the cores: OpenMP threads of several processes wait on each other, and each process
    runs many times slower. Returns the thread count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        warn_if_busy(torch.get_num_threads())
    return torch.get_num_threads()


def warn_if_busy(threads: int) -> None:
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return
    if load < BUSY_SHARE * cores:
        return
    from tunesmith.log import say

    say(f"Warning: the CPU is busy (load average {load:.1f} on {cores} cores) and this process will use "
        f"{threads} threads: processes sharing cores can each run 10-20x slower. Wait for the other work, "
        "or split the cores: train.threads / --threads here, OMP_NUM_THREADS for the others")
