"""A faster LoRA linear layer for CPU training: the same maths as PEFT's, fewer passes over memory.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the matmuls, a scaling
multiply and an add over the whole (tokens x out) output, their backward passes, a second
gradient for x added to the first, and a dropout mask drawn with `bernoulli_`, which on a CPU costs
about as much as a 576 x 576 matmul of the same rows. On short rows these passes are a fifth of a
training step. Here one autograd function does it with matmuls only:

    forward   h = s · (x_d Aᵀ)                  (tokens x r, small)
              y = x Wᵀ + b, then y += h Bᵀ       (one addmm into the base output)
    backward  u = s · (g B)                     (tokens x r)
              grad A = uᵀ x_d,  grad B = gᵀ h,  grad x = g W + u A   (again one addmm)

and dropout draws its mask from 16-bit slices of random 64-bit words (the probability rounded to a
multiple of 1/65536), several times cheaper than `bernoulli_`.

`use_fused_lora(model)` gives each eligible PEFT LoRA Linear this forward. Under CPU autocast to
the frozen weight's dtype (bf16 training: bf16 weights, fp32 LoRA weights and optimizer state) it
computes in that dtype, as autocast makes PEFT's matmuls do, the LoRA weights cast for the call and
their gradients cast back. Whenever a call is outside what it covers (adapters disabled or merged,
several adapters, DoRA, a quantized or sharded base layer, autocast to another dtype, mixed dtypes
without autocast, not a CPU), it runs PEFT's own forward, so results never depend on which path
ran; tests hold the two to 1e-5 in fp32 and to bf16's rounding under autocast.
"""

from __future__ import annotations

from types import MethodType

import torch

UNITS = 65536  # dropout probabilities are multiples of 1/UNITS


def cheap_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each element zeroed with probability p (rounded to k/65536) and the rest scaled by
    1/(1 - p): inverted dropout, like torch's, its mask from torch's generator (seeded and
    checkpointed with it). Three 16-bit draws per random int64 (its top bit is always 0)."""
    cut = round(p * UNITS)
    if cut <= 0:
        return x
    n = x.numel()
    words = torch.empty((n + 2) // 3, dtype=torch.int64, device=x.device).random_()
    draws = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n]  # each uniform over int16
    keep = draws >= (cut - UNITS // 2)  # P(keep) = 1 - cut / UNITS
    return x * (keep.view(x.shape).to(x.dtype) * (UNITS / (UNITS - cut)))


class LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s (x_d Aᵀ) Bᵀ for 2-D x, W and b frozen; x_d is x after dropout, or None (no
    dropout: the adapter reads x itself, and x's two gradients are summed in one addmm)."""

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scaling: float):
        inner = x if dropped is None else dropped
        h = (inner @ lora_a.t()).mul_(scaling)  # (tokens, r)
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(h, lora_b.t())
        ctx.save_for_backward(weight, lora_a, lora_b, inner, h)
        ctx.scaling, ctx.dropped = scaling, dropped is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, lora_a, lora_b, inner, h = ctx.saved_tensors
        scaled = (grad @ lora_b).mul_(ctx.scaling)  # (tokens, r): the gradient at s · (x_d Aᵀ)
        grad_a = scaled.t() @ inner if ctx.needs_input_grad[4] else None
        grad_b = grad.t() @ h if ctx.needs_input_grad[5] else None
        grad_x = grad_dropped = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            if not ctx.dropped:
                grad_x.addmm_(scaled, lora_a)
        if ctx.dropped and ctx.needs_input_grad[1]:
            grad_dropped = scaled @ lora_a
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_dropped, None, grad_bias, grad_a, grad_b, None


def _covered(layer, x: torch.Tensor, args, kwargs) -> tuple[str, torch.dtype] | None:
    """The one active adapter's name, and the dtype to compute in, when this call is one the fused
    path computes as PEFT's does."""
    if args or kwargs or layer.disable_adapters or layer.merged or x.device.type != "cpu":
        return None
    if len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    plain = type(base) is torch.nn.Linear or getattr(type(base), "multiplies_as_linear", False)  # not bnb's 4-bit
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or not plain:
        return None
    weight, lora_a, lora_b = base.weight, layer.lora_A[name].weight, layer.lora_B[name].weight
    if weight.requires_grad or layer.lora_B[name].bias is not None or getattr(layer, "fan_in_fan_out", False):
        return None
    if any(type(t.data) is not torch.Tensor for t in (weight, lora_a, lora_b)):  # e.g. FSDP's DTensors
        return None
    if torch.is_autocast_enabled("cpu"):  # autocast computes PEFT's matmuls in its dtype
        if torch.get_autocast_dtype("cpu") != weight.dtype or not (base.bias is None or base.bias.dtype == weight.dtype):
            return None
        return name, weight.dtype
    if not (x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype):
        return None
    return name, weight.dtype


def _fused_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    covered = _covered(layer, x, args, kwargs)
    if covered is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    name, dtype = covered
    dropout = layer.lora_dropout[name]
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and layer.training else 0.0
    dropped = cheap_dropout(flat, p) if p > 0 else None
    base = layer.base_layer
    with torch.autocast("cpu", enabled=False):  # every operand is in `dtype` already
        y = LoraLinear.apply(flat, dropped, base.weight, base.bias, layer.lora_A[name].weight.to(dtype),
                             layer.lora_B[name].weight.to(dtype), float(layer.scaling[name]))
    return y.view(*x.shape[:-1], y.shape[-1])


def use_fused_lora(model, on: bool = True) -> int:
    """Give every PEFT LoRA Linear in model the fused forward (on), or back PEFT's own (off: for
    comparisons); returns how many layers there are."""
    from peft.tuners.lora.layer import Linear

    layers = [module for module in model.modules() if type(module) is Linear]
    for layer in layers:
        if on:
            layer.forward = MethodType(_fused_forward, layer)
        else:
            layer.__dict__.pop("forward", None)  # the class's forward: PEFT's
    return len(layers)
