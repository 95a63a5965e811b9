"""On a GPU: each packed-row attention backend's loss and gradients against every example run alone,
and the fused output-layer losses against tunesmith's chunked one (to 1e-5 in fp32). Skipped where
there is no CUDA device (CI); run by bench/gpu_check.sh on a lent GPU."""

from __future__ import annotations

import pytest
import torch
from test_loss import varied_split

from tunesmith.train import kernels
from tunesmith.train.batching import pack
from tunesmith.train.loss import chunked_cross_entropy, loss_sum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(tiny_models, family: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models(family), dtype=dtype,
                                                attn_implementation="sdpa").cuda().eval()


def _packed(model, backend: str, split, loss: str = "chunked"):
    setattr(model, kernels.CHOICE_ATTRIBUTE, kernels.Kernels(backend, "test", loss))
    with kernels.packed_attention(model):
        value = loss_sum(model, pack(split, [0, 1, 2]).to("cuda"), chunk_size=16)
    return value, torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad])


def _reference(model, split):
    """Every example alone through transformers' forward with labels: its mean loss × its target count."""
    total = torch.zeros((), device="cuda")
    for index in range(len(split)):
        ids, supervised = split.example(index)
        labels = torch.where(supervised, ids, torch.full_like(ids, -100))
        n_targets = int((labels[1:] != -100).sum())
        total = total + model(input_ids=ids[None].cuda(), labels=labels[None].cuda()).loss * n_targets
    return total, torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])


def _close(got, expected, tolerance: float):
    value, grads = got
    reference, reference_grads = expected
    torch.testing.assert_close(value.float().cpu(), reference.float().cpu(), rtol=tolerance, atol=tolerance)
    for g, r in zip(grads, reference_grads):
        torch.testing.assert_close(g.float(), r.float(), rtol=tolerance * 10, atol=tolerance)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("backend", ["per_example", "flex"])
def test_fp32_packed_attention_backends_equal_each_example_alone(tiny_models, family, backend):
    model = _model(tiny_models, family, torch.float32)
    split = varied_split(model.config.vocab_size)
    _close(_packed(model, backend, split), _reference(model, split), 1e-4)


@pytest.mark.skipif(not kernels.have_flash(), reason="FlashAttention is not installed")
def test_bf16_flash_varlen_equals_the_per_example_loop(tiny_models):
    model = _model(tiny_models, "llama", torch.bfloat16)
    split = varied_split(model.config.vocab_size)
    _close(_packed(model, "flash_varlen", split), _packed(model, "per_example", split), 3e-2)


@pytest.mark.parametrize("kernel", ["liger", "cce"])
def test_fused_loss_kernels_equal_the_chunked_loss_in_fp32(kernel):
    if not kernels.installed(kernels.LOSS_PACKAGES[kernel]):
        pytest.skip(f"{kernels.LOSS_PIP[kernel]} is not installed")
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)  # (n, d)
    layer = torch.nn.Linear(64, 1000, bias=False).cuda()
    targets = torch.randint(0, 1000, (300,), device="cuda")
    fused = kernels.fused_loss_sum(kernel, hidden, layer, targets, None)
    fused_grads = torch.autograd.grad(fused, [hidden, layer.weight])
    chunked = chunked_cross_entropy(hidden, layer, targets, chunk_size=64)
    chunked_grads = torch.autograd.grad(chunked, [hidden, layer.weight])
    torch.testing.assert_close(fused, chunked, rtol=1e-5, atol=1e-5)
    for got, expected in zip(fused_grads, chunked_grads):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
