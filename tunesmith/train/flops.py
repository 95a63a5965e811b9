"""Model FLOPs of a training step, and the peak this machine can do, for MFU.

Per token: 6N for trained weights (forward, input gradient, weight gradient), 4N for frozen
ones (no weight gradient), the output layer only at supervised positions (that is all the
loss computes), plus causal attention, 2·2·d per (query, key) pair forward, ×3 for training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopModel:
    body_trained: int  # trainable parameters in the transformer body
    body_frozen: int  # frozen parameters in the transformer body (embeddings excluded)
    head_params: int  # output layer (vocab x d)
    head_trained: bool
    attention_width: int  # layers x heads x head_dim, summed over layers

    @classmethod
    def of(cls, model) -> FlopModel:
        from tunesmith.train.loss import unwrap

        hf = unwrap(model)
        head = hf.get_output_embeddings().weight
        embed = hf.get_input_embeddings().weight
        trained = frozen = 0
        for parameter in model.parameters():
            if parameter is head or parameter is embed:
                continue
            if parameter.requires_grad:
                trained += parameter.numel()
            else:
                frozen += parameter.numel()
        config = hf.config
        layers = getattr(config, "num_hidden_layers", 0)
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
        return cls(trained, frozen, head.numel(), head.requires_grad, layers * heads * head_dim)

    def step_flops(self, n_tokens: int, n_targets: int, segment_lengths: list[int],
                   context_lengths: list[int] | None = None) -> float:
        """n_tokens: tokens through the model; context_lengths: per segment, the tokens of shared
        beginnings it also attends to."""
        body = (6 * self.body_trained + 4 * self.body_frozen) * n_tokens
        head = (6 if self.head_trained else 4) * self.head_params * n_targets
        shared = sum(n * c for n, c in zip(segment_lengths, context_lengths or []))
        pairs = sum(n * (n + 1) // 2 for n in segment_lengths) + shared
        attention = 3 * 4 * self.attention_width * pairs
        return float(body + head + attention)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0, windows: int = 5) -> float:
    """Dense matmul throughput (FLOP/s) of this device in dtype: the denominator of MFU. The best of
    several short windows: the first ones often run slower (clocks ramping up, pages being touched,
    another process finishing), and a low peak would overstate every MFU measured against it."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows or count == 0:
            a @ b
            count += 1
            if device.type != "cpu" and count % 10:
                continue
            _sync(device)
        _sync(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PEAK_FILE = "peak_flops_v2.json"  # v2: best of several windows (v1 kept one, often a slow first one)


def cached_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The measured peak, remembered per machine so each run does not pay a second for it."""
    from tunesmith.model.load import cache_root

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}"
    path = cache_root() / PEAK_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    key = f"{name}/{dtype}"
    if key not in table:
        table[key] = measure_peak_flops(device, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=2))
    return float(table[key])
