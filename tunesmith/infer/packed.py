"""One forward pass for rows that are at different stages: prompts being prefilled and answers
being decoded go through the model together.

A decode pass feeds each running row one token, yet it costs nearly what a pass of a few dozen
tokens costs on a CPU: every weight is read and every module called once per pass, whatever the
rows. A newcomer's prompt read in a pass of its own pays that again. Here the engine's parts, each
a rectangle of rows x columns with its own KV cache and mask (the running rows' one new token each;
a chunk of the newcomers' prompts), are laid end to end as one sequence: the linear layers and the
MLP see every token at once, and only attention is done part by part, each over its own cache.

    ids        (1, tokens): every part's ids, row after row
    positions  (1, tokens): each token's own position, so rotary and learned embeddings are right
    cache      `_PackedCache`: each layer's new keys and values are written into the parts' caches
    attention  `packed_attention`: each part's queries against its own keys, with a causal mask
               over the part's columns (the queries are its last columns)
    logits     only the columns asked for (`logits_to_keep` as an index)

Only for model types whose layers all attend fully and whose attention writes its keys through the
cache and calls transformers' attention interface (checked in tests/test_engine.py against
separate passes); other models take one pass per part.

A PEFT model serving several LoRA adapters names each row's adapter (`Part.adapters`); the pass
is one sequence, so `tokens_routed` sends each token through its own row's adapter (the engine's
mixed-adapter passes of its own use it too).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache, partial

import torch

from tunesmith.infer.attention import attention_switched, gqa_sdpa, runs_sdpa_on_cpu

PACKED = "tunesmith_packed"
# model types checked against separate passes (tests/test_engine.py)
PACKABLE = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt_neox", "gpt2", "mixtral"})


@dataclass
class Part:
    """Rows fed `ids` (rows, columns) in the same pass: `mask` (rows, width) covers the cache's
    columns after this pass (the new ones are the last), `cache` takes the new keys and values, and
    the logits of the last `keep` columns of every row come back."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object  # a transformers DynamicCache
    keep: int = 1
    adapters: list[str] | None = None  # a PEFT model serving several adapters: each row's adapter name


def packable(model) -> bool:
    """Whether `packed_forward` can run this model: a known model type with full attention in every
    layer, run through transformers' "sdpa" on a CPU."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (getattr(config, "model_type", None) in PACKABLE and all(kind == "full_attention" for kind in layer_types)
            and not getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None) is None
            and runs_sdpa_on_cpu(model))


def packed_forward(model, parts: list[Part], **model_kwargs) -> list[torch.Tensor]:
    """One forward pass of all the parts; each part's logits (rows, keep, vocab), fp32."""
    ids = torch.cat([part.ids.reshape(-1) for part in parts])[None]
    positions = torch.cat([part.positions.reshape(-1) for part in parts])[None]
    kept, offset = [], 0
    for part in parts:
        rows, columns = part.ids.shape
        starts = offset + torch.arange(rows, device=ids.device) * columns + columns - part.keep
        kept.append((starts[:, None] + torch.arange(part.keep, device=ids.device)).reshape(-1))
        offset += rows * columns
    layout = _PackedCache(parts)
    _register()
    names = _token_adapters(parts)
    mixed = names is not None and len(set(names)) > 1
    routed = tokens_routed(model, names) if mixed else nullcontext()
    adapters = {"adapter_names": names[:1]} if names is not None and not mixed else {}
    with attention_switched(model, PACKED), routed:
        output = model(input_ids=ids, position_ids=positions, past_key_values=layout, use_cache=True,
                       logits_to_keep=torch.cat(kept), tunesmith_packed=layout, **adapters, **model_kwargs)
    logits = output.logits[0].float()  # (kept, vocab)
    pieces = logits.split([len(k) for k in kept])
    return [piece.view(part.ids.shape[0], part.keep, -1) for piece, part in zip(pieces, parts)]


def _token_adapters(parts: list[Part]) -> list[str] | None:
    """Each token's adapter name, in the packed order; None when no part names its rows' adapters."""
    if all(part.adapters is None for part in parts):
        return None
    return [name for part in parts for name in per_token(part.adapters, part.ids.shape[1])]


def per_token(row_names: list[str], columns: int) -> list[str]:
    """Rows' adapter names, one per token of rows x columns laid end to end."""
    return [name for name in row_names for _ in range(columns)]


def routable(model) -> bool:
    """Whether `tokens_routed` can run this PEFT model: plain LoRA on linear layers only (no DoRA or
    other variants, nothing merged, no extra trained modules such as modules_to_save)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
    return bool(layers) and all(type(m) is LoraLinear and not m.lora_variant and not m.merged for m in layers)


@contextmanager
def tokens_routed(model, names: list[str]):
    """Each token of a packed pass through its own row's LoRA adapter ("__base__": none). PEFT mixes
    adapters per row of a batch, and a packed pass is one row; here, for the pass, every LoRA layer
    computes its base layer for all tokens, then each adapter's update for its tokens only (their
    indices built once for the pass), added in place."""
    from peft.tuners.lora import LoraLayer

    routes: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        routes.setdefault(name, []).append(index)
    indices = {name: torch.tensor(at) for name, at in routes.items() if name != "__base__"}
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = partial(_routed_forward, layer, indices)
    try:
        yield
    finally:
        for layer, forward in zip(layers, before, strict=True):
            del layer.forward
            if forward is not None:
                layer.forward = forward


def _routed_forward(layer, indices: dict[str, torch.Tensor], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    tokens, out = x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1])
    for name, at in indices.items():
        if name not in layer.lora_A:
            continue
        update = layer.lora_A[name](layer.lora_dropout[name](tokens.index_select(0, at)))
        out.index_add_(0, at, (layer.lora_B[name](update) * layer.scaling[name]).to(out.dtype))
    return result


class _PackedCache:
    """Stands in for the model's cache during a packed pass: each layer's new keys and values, laid
    end to end, are written into the parts' own caches; the attention reads them from there."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.sizes = [part.ids.numel() for part in parts]
        self.masks = [_causal_mask(part) for part in parts]
        self.current: list[tuple[torch.Tensor, torch.Tensor]] = []  # this layer's keys and values per part

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.current = []
        for part, keys, values in zip(self.parts, key_states.split(self.sizes, dim=2),
                                      value_states.split(self.sizes, dim=2)):
            self.current.append(part.cache.update(_rows(keys, part), _rows(values, part), layer_idx))
        return key_states, value_states

    def get_seq_length(self, *args, **kwargs) -> int:  # asked by models that build positions themselves
        return 0


def _rows(packed: torch.Tensor, part: Part) -> torch.Tensor:
    """(1, heads, rows x columns, head_dim) laid end to end -> (rows, heads, columns, head_dim)."""
    rows, columns = part.ids.shape
    return packed[0].unflatten(1, (rows, columns)).transpose(0, 1)


def _causal_mask(part: Part) -> torch.Tensor:
    """(rows, 1, columns, width) bool: a new column sees the row's real columns up to itself, and
    always itself (a padding column attending nothing would give NaN, and 0 x NaN is NaN later)."""
    columns, width = part.ids.shape[1], part.mask.shape[1]
    query_at = torch.arange(width - columns, width, device=part.mask.device)[:, None]  # (columns, 1)
    key_at = torch.arange(width, device=part.mask.device)[None, :]  # (1, width)
    seen = part.mask.bool()[:, None, :] | (key_at == query_at)[None]  # (rows, columns, width)
    return (seen & (key_at <= query_at)[None])[:, None]


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    # query: (1, heads, tokens, head_dim), every part's rows laid end to end
    layout: _PackedCache = kwargs.pop("tunesmith_packed")
    outputs = []
    for (keys, values), mask, part, queries in zip(layout.current, layout.masks, layout.parts,
                                                   query.split(layout.sizes, dim=2)):
        output, _ = gqa_sdpa(module, _rows(queries, part), keys, values, mask, dropout=dropout, scaling=scaling,
                             **kwargs)  # (rows, columns, heads, head_dim)
        outputs.append(output.flatten(0, 1))
    return torch.cat(outputs)[None], None


@cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention)  # no mask function: the parts bring their own
