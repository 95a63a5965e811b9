"""The output layer of generation on a CPU, through oneDNN with its weight laid out once.

A pass of the engine asks the output layer for a few rows of logits (one per running row, plus a
newcomer's last prompt token), and MKL's matrix multiply is at its worst there: for 8 rows against
SmolLM2's 49,152 x 576 output weight it ran at about a third of the memory's bandwidth, slower
than 8 rows deserve. oneDNN, given the weight already laid out for its kernel, did the same in less
than half the time at 8 rows, 1.9x faster at 33, about even at 128 and slower beyond
(tools measured in bench/RESULTS.md, "Serving"). The weight is the same every pass, so it is laid
out once, into a copy: the output layer is often the input embedding too (tied), and training may
still own it. The copy costs one more output weight of memory, so it is made only where that is a
real share of a pass (at least MIN_BYTES) and no more than MAX_BYTES.

The copy is used for up to MAX_ROWS rows of fp32 without autograd, while the weight is the very
tensor it was made from, unchanged since (its version counter: an optimizer step or a merge
counts); otherwise the layer computes as it always did. `lay_out(model)` makes it afresh (about
50 ms for SmolLM2), once per engine: an edit through `.data` (as PEFT merges) moves no version.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

MIN_BYTES = 16 << 20  # a smaller output weight is a small share of a pass: no copy
MAX_BYTES = 1 << 30  # the most memory the copy may take
MAX_ROWS = 128  # measured 1.17x faster at 128 rows, 0.89x at 512: beyond, MKL's own multiply


class LaidOut:
    """A Linear layer's forward that multiplies by a oneDNN copy of its weight where it may."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = weakref.ref(layer)
        self.source = weakref.ref(layer.weight)
        self.version = layer.weight._version
        self.weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 8)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.layer()
        if not self.applies(layer, hidden):
            return F.linear(hidden, layer.weight, layer.bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, self.weight, layer.bias, "none", [], "")

    def applies(self, layer: torch.nn.Linear, hidden: torch.Tensor) -> bool:
        rows = hidden.numel() // hidden.shape[-1]
        return (not torch.is_grad_enabled() and rows <= MAX_ROWS and hidden.dtype == torch.float32
                and hidden.device.type == "cpu" and self.source() is layer.weight
                and layer.weight._version == self.version)


def lay_out(model) -> bool:
    """Give the model's output layer a fresh oneDNN copy of its weight; whether it has one now.
    Nothing changes where it does not fit the rules above."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(layer) is not torch.nn.Linear or not _fits(layer.weight):
        return False
    layer.__dict__.pop("forward", None)  # always afresh: an edit through `.data` leaves no version behind
    try:
        fresh = LaidOut(layer)
        probe = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0))  # not the global RNG
        with torch.no_grad():
            if not torch.allclose(fresh(probe), F.linear(probe, layer.weight, layer.bias), rtol=1e-4, atol=1e-4):
                return False
    except (RuntimeError, AttributeError):  # a torch build without oneDNN's linear, an inference tensor
        return False
    layer.forward = fresh
    return True


def _fits(weight: torch.Tensor) -> bool:
    size = weight.numel() * weight.element_size()
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and MIN_BYTES <= size <= MAX_BYTES)
