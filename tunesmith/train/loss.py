"""Cross-entropy over supervised positions only, computed in chunks.

The full (tokens x vocabulary) logits matrix is never held: hidden states are gathered at the
positions that predict a supervised token, then the output layer and the loss run chunk by
chunk. In fp32 without a logit transform (the CPU default) each chunk's gradient is computed in
the forward pass itself (softmax minus one-hot, times the output weight), so backward neither
recomputes the logits nor runs log_softmax's backward; elsewhere each chunk runs under activation
checkpointing. Either way one chunk's logits are held at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from tunesmith.train.attention import VARLEN
from tunesmith.train.kernels import fused_loss_sum, loss_kernel


def inner(model):
    """The model inside the training wrappers (DistributedDataParallel, PackedLoss); PEFT's is kept."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.model if isinstance(model, PackedLoss) else model


def unwrap(model):
    """The transformers model inside the training wrappers and PEFT's (LoRA layers are injected in place)."""
    model = inner(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_root(model) -> bool:
    """A module whose forward runs the model and its loss together (train through its call)."""
    return isinstance(model, (PackedLoss, DistributedDataParallel))


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def logit_transform(config):
    """Scalings some families apply to logits (soft-capping, logit scales), as one function; None
    for the families that apply none."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    if softcap is None and scale is None and divide is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _chunk_loss(hidden, weight, bias, targets, transform):
    logits = F.linear(hidden, weight, bias).float()  # (chunk, vocab) in fp32 for a stable softmax
    return F.cross_entropy(transform(logits), targets, reduction="sum")


def _chunk_logps(hidden, weight, bias, targets, transform):
    logits = F.linear(hidden, weight, bias).float()
    return -F.cross_entropy(transform(logits), targets, reduction="none")  # (chunk,)


EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, still a normal float32
PIECE_BYTES = 24 * 2**20  # the fused loss's logits per piece: under glibc's 32 MiB mmap threshold, so each
# piece's buffers are reused from the heap instead of mapped afresh (and page-faulted) every time


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden Wᵀ + b) against targets, its gradients made piece by piece
    during the forward pass and kept (n x d for hidden, the shape of W and b where they train).
    Pieces are at most chunk_size rows, fewer where the vocabulary is large (PIECE_BYTES)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, grad_enabled: bool):
        want_hidden, want_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        want_bias = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        piece = max(8, min(chunk_size, PIECE_BYTES // (4 * weight.shape[0])))
        for start in range(0, hidden.shape[0], piece):
            h, t = hidden[start: start + piece], targets[start: start + piece]
            logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # (piece, vocab)
            shifted = logits.sub_(logits.amax(dim=-1, keepdim=True).expand_as(logits))  # all <= 0, in place
            rows = torch.arange(t.shape[0], device=t.device)
            target = shifted[rows, t]
            # exp of a float32 below -87 underflows, and the CPU's vectorised exp takes a slow path for
            # it (about 10x slower per element; a trained model's logits span hundreds). Clamped there,
            # a term is 1.6e-38 instead of 0: nothing next to the sum's float32 rounding.
            exps = shifted.clamp_(min=EXP_FLOOR).exp_()
            sums = exps.sum(dim=-1)
            total += (sums.log() - target).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            probabilities = exps.div_(sums[:, None])  # softmax, in place
            probabilities[rows, t] -= 1.0  # d loss / d logits
            if want_hidden:
                torch.mm(probabilities, weight, out=grad_hidden[start: start + piece])
            if want_weight:
                grad_weight.addmm_(probabilities.t(), h)
            if want_bias:
                grad_bias += probabilities.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad for g in (grad_hidden, grad_weight, grad_bias)]
        return *scaled, None, None, None


def _fused_applies(hidden, output_layer, transform) -> bool:
    """The fused loss covers fp32 maths without a logit transform, outside autocast."""
    weight, bias = output_layer.weight, output_layer.bias
    same = hidden.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    return same and transform is None and not torch.is_autocast_enabled(hidden.device.type)


def chunked_cross_entropy(hidden, output_layer, targets, transform=None, chunk_size=1024):
    """Sum of cross-entropy over rows of hidden (n, d) against targets (n,)."""
    if _fused_applies(hidden, output_layer, transform):
        return LinearCrossEntropy.apply(hidden, output_layer.weight, output_layer.bias, targets, chunk_size,
                                        torch.is_grad_enabled())
    transform = transform or _identity
    total = hidden.new_zeros((), dtype=torch.float32)
    for piece in _chunks(_chunk_loss, hidden, output_layer, targets, transform, chunk_size):
        total = total + piece
    return total


def chunked_token_logps(hidden, output_layer, targets, transform=None, chunk_size=1024) -> torch.Tensor:
    """log p(target) of every row of hidden (n, d): (n,) in fp32, one chunk of logits at a time."""
    transform = transform or _identity
    pieces = list(_chunks(_chunk_logps, hidden, output_layer, targets, transform, chunk_size))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunks(function, hidden, output_layer, targets, transform, chunk_size):
    weight, bias = output_layer.weight, output_layer.bias
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start: start + chunk_size], targets[start: start + chunk_size]
        if torch.is_grad_enabled():  # backward recomputes this chunk's logits instead of keeping them
            yield checkpoint(function, h, weight, bias, t, transform, use_reentrant=False)
        else:
            yield function(h, weight, bias, t, transform)


class PackedLoss(torch.nn.Module):
    """The model and its loss as one module, so one forward call covers every weight used.

    loss_sum calls the decoder and then the output layer's weight directly; FSDP2 gathers a
    module's sharded weights only around its forward and backward, and DDP prepares its gradient
    reduction in its forward. With this module as the root, the embeddings, final norm and output
    layer take part in both for the whole loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, chunk_size: int = 1024, per_token: bool = False) -> torch.Tensor:
        return _token_logps(self.model, batch, chunk_size) if per_token else _loss_sum(self.model, batch, chunk_size)


def loss_sum(model, batch, chunk_size: int = 1024) -> torch.Tensor:
    """Summed loss of a packed micro batch (divide by the window's target count outside)."""
    return model(batch, chunk_size) if is_root(model) else _loss_sum(model, batch, chunk_size)


def token_logps(model, batch, chunk_size: int = 1024) -> torch.Tensor:
    """log p of every supervised token of a packed batch: (n_targets,)."""
    return model(batch, chunk_size, per_token=True) if is_root(model) else _token_logps(model, batch, chunk_size)


def _loss_sum(model, batch, chunk_size: int) -> torch.Tensor:
    hf_model = unwrap(model)
    hidden, kernel = supervised_hidden(hf_model, batch), loss_kernel(hf_model)
    if kernel != "chunked":  # a fused CUDA kernel the run asked for (train/kernels.py checked it applies)
        softcap = getattr(hf_model.config, "final_logit_softcapping", None)
        return fused_loss_sum(kernel, hidden, hf_model.get_output_embeddings(), batch.targets, softcap)
    return chunked_cross_entropy(hidden, hf_model.get_output_embeddings(), batch.targets,
                                 logit_transform(hf_model.config), chunk_size)


def _token_logps(model, batch, chunk_size: int) -> torch.Tensor:
    hf_model = unwrap(model)
    return chunked_token_logps(supervised_hidden(hf_model, batch), hf_model.get_output_embeddings(),
                               batch.targets, logit_transform(hf_model.config), chunk_size)


def supervised_hidden(hf_model, batch) -> torch.Tensor:
    """Final hidden states at the positions that predict a supervised token: (n_targets, d)."""
    if batch.shares and hf_model.config._attn_implementation != VARLEN:
        raise ValueError("a packed batch with a shared beginning needs packed_attention (the per-example loop)")
    out = hf_model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                              tunesmith_segments=batch.segments, tunesmith_parents=batch.parents)
    hidden = out.last_hidden_state[0]  # (T, d)
    return hidden[batch.predict_at]  # (n_targets, d): no logits for masked positions
