"""The linear layers of generation on a CPU, through oneDNN with their weights laid out once.

A pass of the engine multiplies a few rows (one per running row, plus a newcomer's prompt tokens)
by every weight of the model, and torch's own multiply is at its worst there: it lays the weight
out for the kernel again on every call. oneDNN, given the weight laid out ahead of time, gives the
same products faster (bench/output_layer.py; figures in bench/RESULTS.md, "Serving"):
- fp32, SmolLM2's 49,152 x 576 output weight: 2.0x at 8 rows, 1.4x at 33, 1.2x at 128;
- bf16 (AMD EPYC with avx512_bf16): its 576 x 1,536 MLP weights 2.0-2.7x at 1 row, 1.4-2x at 8,
  1.2x at 64; the output weight 2.7x at 1 row, 1.4x at 64; the engine's decode step 0.71x the time
  at 1 running row, 0.85x at 8, the same greedy tokens.
The weights are the same every pass, so each is laid out once, into a copy: an output layer is
often the input embedding too (tied), and training may still own the weight. The copies cost one
more model's worth of memory, so they are made output layer first, then the other linear layers
in module order, until MAX_BYTES; a layer past it computes as before.

A laid-out layer becomes a `LaidOutLinear` (an nn.Linear: same weights, state dict and saving; its
copy lives outside it, so a deep copy or a pickle of the model is a plain one). The copy is used for
up to MAX_ROWS rows in the weight's own dtype (fp32 or bf16) without autograd, while the weight is
the very tensor it was made from, unchanged since (its version counter: an optimizer step counts);
otherwise the layer computes as it always did. `lay_out(model)` makes the copies afresh (under a
second for SmolLM2), once per engine: an edit through `.data` (as PEFT merges) moves no version
counter. PEFT's LoRA layers call their base layer and adapters as modules, so those are laid out
too.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

MAX_BYTES = 2 << 30  # the most memory the copies may take, all layers together
MAX_ROWS = 256  # faster up to here in both dtypes (fp32's output layer: no faster from about 256)
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # the probe's agreement with the layer's own multiply


class Copy:
    """A oneDNN copy of a Linear layer's weight, and when it may stand in for the weight."""

    def __init__(self, layer: torch.nn.Linear):
        self.source = weakref.ref(layer.weight)
        self.version = layer.weight._version
        self.weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())

    def applies(self, layer: torch.nn.Linear, hidden: torch.Tensor) -> bool:
        rows = hidden.numel() // hidden.shape[-1]
        return (not torch.is_grad_enabled() and rows <= MAX_ROWS and hidden.dtype == layer.weight.dtype
                and hidden.device.type == "cpu" and self.source() is layer.weight
                and layer.weight._version == self.version)


# layer -> its copy, outside the layer itself: a deep copy or a pickle of the model carries no
# opaque oneDNN tensor and no stale copy (the copied layer simply multiplies by its own weight)
COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LaidOutLinear(torch.nn.Linear):
    """nn.Linear whose forward multiplies by its copy in COPIES where the copy applies. `lay_out`
    gives a layer this class in place; its weights, state dict and saving are unchanged."""

    multiplies_as_linear = True  # under autograd exactly F.linear: a fused LoRA layer may use its weight directly

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        copy = COPIES.get(self)
        if copy is None or not copy.applies(self, hidden):
            return F.linear(hidden, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, copy.weight, self.bias, "none", [], "")


def lay_out(model) -> int:
    """Give the model's linear layers fresh oneDNN copies of their weights, the output layer first,
    within MAX_BYTES; returns how many layers have one now (0 where none fits the rules above)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    drop(model)  # always afresh: an edit through `.data` leaves no version behind
    budget, laid_out = MAX_BYTES, 0
    for layer in _linear_layers(model):
        size = layer.weight.numel() * layer.weight.element_size()
        if size > budget or not _fits(layer.weight):
            continue
        copy = _checked_copy(layer)
        if copy is None:
            continue
        layer.__class__ = LaidOutLinear
        COPIES[layer] = copy
        budget -= size
        laid_out += 1
    return laid_out


def drop(model) -> None:
    """Every laid-out layer back to a plain nn.Linear, its copy freed."""
    for layer in model.modules():
        if type(layer) is LaidOutLinear:
            COPIES.pop(layer, None)
            layer.__class__ = torch.nn.Linear


def is_laid_out(layer) -> bool:
    return type(layer) is LaidOutLinear and layer in COPIES


def _linear_layers(model) -> list[torch.nn.Linear]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rest = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not output]
    return ([output] if type(output) is torch.nn.Linear else []) + rest


def _checked_copy(layer: torch.nn.Linear) -> Copy | None:
    """The layer's copy, if its product agrees with the layer's own on a probe."""
    try:
        copy = Copy(layer)
        probe = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0)).to(layer.weight.dtype)
        with torch.no_grad():
            laid_out = torch.ops.mkldnn._linear_pointwise(probe, copy.weight, layer.bias, "none", [], "")
            expected = F.linear(probe, layer.weight, layer.bias)
    except (RuntimeError, AttributeError):  # a torch build without oneDNN's linear, an inference tensor
        return None
    tolerance = TOLERANCE[layer.weight.dtype]
    return copy if torch.allclose(laid_out.float(), expected.float(), rtol=tolerance, atol=tolerance) else None


def _fits(weight: torch.Tensor) -> bool:
    return weight.dtype in DTYPES and weight.device.type == "cpu"
