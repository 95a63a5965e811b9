"""Attention for packed rows: each example attends only to itself, with no padding and no
block-diagonal mask. The packed row is cut at example boundaries and SDPA runs causally on each
piece — the CPU counterpart of flash-attention's varlen kernel. Costs O(sum of len^2), not O(T^2).
A layer's sliding window, which transformers passes to the attention function, is honoured.

In bf16 on a CPU a short piece is attended in fp32 (FP32_BELOW): torch's CPU flash attention
forward and backward take about twice as long in bf16 as in fp32 for 64-166 tokens (the same at
about 256-400, faster in bf16 from there; measured on an AMD EPYC with avx512_bf16).

A segment may continue a shared beginning, a segment of its own (train/batching.py: a system block
every example of the row shares, or a preference pair's prompt): its queries then see that
beginning's keys and values before their own, as if they were its own first tokens.

Registered with transformers' AttentionInterface under VARLEN; train/kernels.py's
`packed_attention(model)` switches a model to it (or to a CUDA kernel, train/varlen_cuda.py) only for
training forwards (generation keeps SDPA with its padding mask).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache

import torch
import torch.nn.functional as F

VARLEN = "tunesmith_varlen"
FP32_BELOW = 256  # bf16 pieces shorter than this are attended in fp32 on a CPU (see above)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     **kwargs):
    # query: (1, heads, T, head_dim); key, value: (1, kv_heads, T, head_dim)
    segments = kwargs.get("tunesmith_segments")
    parents = kwargs.get("tunesmith_parents") or ()  # per segment: the shared beginning it continues, or -1
    if parents and sliding_window:
        raise ValueError("a shared beginning cannot be combined with a sliding window")  # pack() never does
    lengths = segment_lengths(segments, query.shape[2])
    groups = query.shape[1] // key.shape[1]
    pieces = list(zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)))
    dropout_p = dropout if module.training else 0.0
    outputs = []
    for index, (q, k, v) in enumerate(pieces):  # split, not slicing: its backward is one concatenation
        context = ancestors(parents, index)
        if context:  # the shared beginnings' keys and values come first, as if they were its own
            k = torch.cat([pieces[a][1] for a in context] + [k], dim=2)
            v = torch.cat([pieces[a][2] for a in context] + [v], dim=2)
            causal = {"attn_mask": _after_prefix(q.shape[2], k.shape[2] - q.shape[2], q.device)}
        else:
            causal = _causal(q.shape[2], sliding_window, q.device)
        widen = q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[2] < FP32_BELOW
        if widen:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if widen else nullcontext():  # autocast would narrow them again
            output = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scaling,
                                                    enable_gqa=groups > 1, **causal)
        outputs.append(output.to(torch.bfloat16) if widen else output)
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (1, heads, T, head_dim)
    return output.transpose(1, 2).contiguous(), None


def ancestors(parents: tuple[int, ...], index: int) -> list[int]:
    """The shared beginnings segment `index` continues (parents: see train/batching.py's
    PackedBatch), first one first."""
    chain, parent = [], parents[index] if parents else -1
    while parent >= 0:
        chain.append(parent)
        parent = parents[parent]
    return chain[::-1]


def _after_prefix(length: int, prefix: int, device) -> torch.Tensor:
    """(length, prefix + length): query i sees the whole prefix and its own tokens up to i."""
    return torch.ones(length, prefix + length, dtype=torch.bool, device=device).tril(diagonal=prefix)


def _causal(length: int, sliding_window: int | None, device) -> dict:
    """SDPA's arguments for causal attention; with a sliding window (Gemma 3's local layers, Mistral,
    Qwen2 with use_sliding_window) a token sees only itself and the window - 1 tokens before it."""
    if not sliding_window or length <= sliding_window:
        return {"is_causal": True}
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]  # (T, T): query index minus key index
    return {"attn_mask": (distance >= 0) & (distance < sliding_window)}


def segment_lengths(segments, total: int) -> list[int]:
    """Each example's length in a packed row of `total` tokens (one example where no segments are given)."""
    return [end - start for start, end in segments] if segments else [total]


def no_mask(*args, **kwargs):
    return None  # segments carry the structure; a (T, T) mask is never built


@cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, no_mask)
