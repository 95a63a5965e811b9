"""Attention over packed rows with one kernel call per layer, for CUDA (train/kernels.py chooses):

    flash_varlen  FlashAttention's variable-length kernel: the examples' boundaries go in as cumulative
                  lengths (cu_seqlens), so no mask exists at all
    flex          PyTorch's flex attention with a block mask built from the examples' boundaries: blocks
                  that cross examples are skipped, not computed and masked

Both take the same arguments as transformers' attention functions and read the packed row's
example boundaries from the `tunesmith_segments` keyword the loss passes down (train/loss.py). A
layer's sliding window is honoured: a token sees itself and the window - 1 tokens before it.
Attention dropout (which neither takes here) falls back to the per-example SDPA loop.
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch

from tunesmith.train.attention import no_mask, segment_lengths, varlen_attention

FLASH = "tunesmith_flash_varlen"
FLEX = "tunesmith_flex"


@cache
def _flash_function():
    """FlashAttention 3's varlen function where installed (Hopper), else FlashAttention 2's."""
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError:
        from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func


def flash_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, **kwargs):
    # query: (1, heads, T, head_dim); key, value: (1, kv_heads, T, head_dim); FlashAttention wants (T, heads, d)
    if dropout and module.training:
        return varlen_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
    lengths = tuple(segment_lengths(kwargs.get("tunesmith_segments"), query.shape[2]))
    starts = _cumulative_lengths(lengths, str(query.device))
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)  # (left, right) tokens seen
    output = _flash_function()(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        cu_seqlens_q=starts, cu_seqlens_k=starts, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
        softmax_scale=scaling, causal=True, window_size=window)
    output = output[0] if isinstance(output, tuple) else output  # FlashAttention 3 may return (out, lse)
    return output.unsqueeze(0), None  # (1, T, heads, head_dim)


@lru_cache(maxsize=16)  # one copy to the GPU per packed row, not one per layer and pass
def _cumulative_lengths(lengths: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)  # (n + 1,)


@lru_cache(maxsize=16)  # one mask per packed row and window, reused by every layer of a forward and backward
def _block_mask(lengths: tuple[int, ...], sliding_window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    example = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))  # (T,): which example a token is in

    def same_example_causal(batch, head, q, kv):
        seen = (example[q] == example[kv]) & (q >= kv)
        return seen & (q - kv < sliding_window) if sliding_window else seen

    total = sum(lengths)
    return create_block_mask(same_example_causal, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)


@cache
def _flex_function(device_type: str):
    """Compiled on CUDA (eager flex attention materialises every score); eager elsewhere (tests,
    where it runs forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention


def flex_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          sliding_window=None, **kwargs):
    if dropout and module.training:
        return varlen_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
    lengths = tuple(segment_lengths(kwargs.get("tunesmith_segments"), query.shape[2]))
    block_mask = _block_mask(lengths, sliding_window, str(query.device))
    groups = query.shape[1] // key.shape[1]
    output = _flex_function(query.device.type)(query, key, value, block_mask=block_mask, scale=scaling,
                                               enable_gqa=groups > 1)  # (1, heads, T, head_dim)
    return output.transpose(1, 2).contiguous(), None


@cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, function in ((FLASH, flash_varlen_attention), (FLEX, flex_varlen_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, no_mask)
