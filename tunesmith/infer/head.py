"""The output layer of generation on a CPU, through oneDNN with its weight laid out once.

A pass of the engine asks the output layer for a few rows of logits (one per running row, plus a
newcomer's last prompt token), and MKL's matrix multiply is at its worst there: 8 rows against
SmolLM2's 49,152 x 576 output weight took 3.5x as long as 1 row, reading the weight at a third of
the memory's speed. oneDNN, given the weight laid out for its kernel ahead of time, was 2.0x faster
at 8 rows, 1.4x at 33, 1.2x at 128 and no faster from about 256 (bench/output_layer.py; its figures
in bench/RESULTS.md, "Serving"). The weight is the same every pass, so it is laid out once, into a
copy: the output layer is often the input embedding too (tied), and training may still own it. The
copy costs one more output weight of memory, so it is made only where that is a real share of a
pass (at least MIN_BYTES) and no more than MAX_BYTES.

The layer becomes a `LaidOutLinear` (an nn.Linear: same weights, state dict and saving; its copy
lives outside it, so a deep copy or a pickle of the model is a plain one). The copy is used for up
to MAX_ROWS rows of fp32 without autograd, while the weight is the very tensor it was made from,
unchanged since (its version counter: an optimizer step counts); otherwise the layer computes as it
always did. `lay_out(model)` makes the copy afresh (about 50 ms for SmolLM2), once per engine: an
edit through `.data` (as PEFT merges) moves no version counter.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

MIN_BYTES = 16 << 20  # a smaller output weight is a small share of a pass: no copy
MAX_BYTES = 1 << 30  # the most memory the copy may take
MAX_ROWS = 128  # 1.1-1.2x faster at 128 rows, even from about 256: beyond, MKL's own multiply


class Copy:
    """A oneDNN copy of a Linear layer's weight, and when it may stand in for the weight."""

    def __init__(self, layer: torch.nn.Linear):
        self.source = weakref.ref(layer.weight)
        self.version = layer.weight._version
        self.weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 8)

    def applies(self, layer: torch.nn.Linear, hidden: torch.Tensor) -> bool:
        rows = hidden.numel() // hidden.shape[-1]
        return (not torch.is_grad_enabled() and rows <= MAX_ROWS and hidden.dtype == torch.float32
                and hidden.device.type == "cpu" and self.source() is layer.weight
                and layer.weight._version == self.version)


# layer -> its copy, outside the layer itself: a deep copy or a pickle of the model carries no
# opaque oneDNN tensor and no stale copy (the copied layer simply multiplies by its own weight)
COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LaidOutLinear(torch.nn.Linear):
    """nn.Linear whose forward multiplies by its copy in COPIES where the copy applies. `lay_out`
    gives an output layer this class in place; its weights, state dict and saving are unchanged."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        copy = COPIES.get(self)
        if copy is None or not copy.applies(self, hidden):
            return F.linear(hidden, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, copy.weight, self.bias, "none", [], "")


def lay_out(model) -> bool:
    """Give the model's output layer a fresh oneDNN copy of its weight; whether it has one now.
    Nothing changes where it does not fit the rules above."""
    layer = _output_layer(model)
    if type(layer) not in (torch.nn.Linear, LaidOutLinear) or not _fits(layer.weight):
        return False
    COPIES.pop(layer, None)  # always afresh: an edit through `.data` leaves no version behind
    try:
        copy = Copy(layer)
        probe = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0))  # not the global RNG
        with torch.no_grad():
            laid_out = torch.ops.mkldnn._linear_pointwise(probe, copy.weight, layer.bias, "none", [], "")
            if not torch.allclose(laid_out, F.linear(probe, layer.weight, layer.bias), rtol=1e-4, atol=1e-4):
                return False
    except (RuntimeError, AttributeError):  # a torch build without oneDNN's linear, an inference tensor
        return False
    layer.__class__ = LaidOutLinear
    COPIES[layer] = copy
    return True


def drop(model) -> None:
    """The output layer back to a plain nn.Linear, its copy freed."""
    layer = _output_layer(model)
    if type(layer) is LaidOutLinear:
        COPIES.pop(layer, None)
        layer.__class__ = torch.nn.Linear


def _output_layer(model):
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _fits(weight: torch.Tensor) -> bool:
    size = weight.numel() * weight.element_size()
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and MIN_BYTES <= size <= MAX_BYTES)
