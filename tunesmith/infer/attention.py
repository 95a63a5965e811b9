"""Attention for generation on a CPU: grouped-query heads without copying the keys and values.

With a padding mask, transformers' SDPA path repeats every key and value head for the query heads
that share it (`repeat_kv`) before calling the kernel: for SmolLM2 (9 query heads, 3 key/value
heads) a prefill of 240 rows x 58 columns copies 32 MB per layer, twice, and such blocks come as
fresh pages from the kernel each time. PyTorch's CPU flash-attention kernel takes grouped heads and
a mask as they are (`enable_gqa`), with the same result to the bit: a multi-token pass of the engine
calls it directly. One-token decode passes, models without grouped heads, and anything SDPA cannot
express here (a position bias, soft-capping) keep transformers' own function.

`grouped_query_attention(model)` switches a model to it for the duration of a forward pass, only
where it would otherwise run transformers' "sdpa" on a CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

import torch.nn.functional as F

GQA_SDPA = "tunesmith_gqa_sdpa"


def gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    # query: (rows, heads, q, head_dim); key, value: (rows, kv_heads, kv, head_dim)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = query.shape[1] != key.shape[1]
    unmasked_with_cache = attention_mask is None and key.shape[2] != query.shape[2]
    if (not grouped or query.shape[2] == 1 or unmasked_with_cache or kwargs.get("position_bias") is not None
            or kwargs.get("softcap")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = attention_mask is None and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                            dropout_p=dropout if module.training else 0.0, scale=scaling,
                                            is_causal=causal, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


@cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)  # the same boolean mask SDPA gets


def runs_sdpa_on_cpu(model) -> bool:
    """Whether the model attends through transformers' "sdpa" on a CPU (what these paths replace)."""
    return (getattr(model.config, "_attn_implementation", None) == "sdpa"
            and next(model.parameters()).device.type == "cpu")


@contextmanager
def attention_switched(model, name: str):
    """The model attends through the registered attention function `name` until the block ends."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextmanager
def grouped_query_attention(model):
    if not runs_sdpa_on_cpu(model):
        yield
        return
    register()
    with attention_switched(model, GQA_SDPA):
        yield
