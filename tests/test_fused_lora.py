"""The fused LoRA linear layer (issue 20, item 2): the same values and gradients as PEFT's forward and
as the formula in plain PyTorch, its cheap dropout is dropout, and PEFT's path runs wherever the
fused one does not apply."""

from __future__ import annotations

import pytest
import torch
from test_methods import NO_AUTOCAST, build, fixed_batch

from tunesmith.config import RunConfig
from tunesmith.model import fused_lora
from tunesmith.model.adapters import load_for_training, prepare_for_training
from tunesmith.model.fused_lora import LoraLinear, cheap_dropout, use_fused_lora
from tunesmith.train.loop import train_step


def fused_layers(model) -> dict:
    return {m: m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__}


def loss_and_grads(model, batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = float(train_step(model, [batch], NO_AUTOCAST, 64))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def randomised_adapters(model) -> None:
    """PEFT starts B at zero; a random B makes the adapters' share of the output and gradients real."""
    generator = torch.Generator().manual_seed(3)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1


def test_lora_training_uses_the_fused_layer_on_every_adapted_linear(llama):
    model, _ = build(llama, "lora")
    layers = fused_layers(model)
    peft_linear = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    assert len(layers) == peft_linear > 0


def test_fused_equals_peft_loss_and_gradients(llama):
    model, _ = build(llama, "lora")
    randomised_adapters(model)
    model.train()
    batch = fixed_batch(model.config.vocab_size)
    assert fused_layers(model)
    fused_loss, fused_grads = loss_and_grads(model, batch)
    use_fused_lora(model, on=False)
    assert not fused_layers(model)
    peft_loss, peft_grads = loss_and_grads(model, batch)
    assert fused_loss == pytest.approx(peft_loss, abs=1e-5)
    assert fused_grads.keys() == peft_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_training_under_autocast_takes_the_fused_layer_and_trains_as_peft(llama, monkeypatch):
    """precision bf16: frozen weights in bf16, LoRA weights in fp32, the maths under autocast. The
    fused layer computes in bf16 as autocast makes PEFT's matmuls do; loss and gradients agree with
    PEFT's path to bf16's rounding, and the LoRA gradients arrive in fp32 for their fp32 weights."""
    config = RunConfig.model_validate({"model": str(llama), "method": "lora", "lora": {"dropout": 0.0}})
    torch.manual_seed(0)
    model = prepare_for_training(load_for_training(llama, config, "cpu", torch.bfloat16), config, torch.bfloat16)
    randomised_adapters(model)
    model.train()
    calls = []
    real = fused_lora.LoraLinear.apply
    monkeypatch.setattr(fused_lora.LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    batch = fixed_batch(model.config.vocab_size)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)

    def run():
        model.zero_grad(set_to_none=True)
        loss = float(train_step(model, [batch], bf16, 64))
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = run()
    assert calls and all(g.dtype == torch.float32 for g in fused_grads.values())
    use_fused_lora(model, on=False)
    calls.clear()
    peft_loss, peft_grads = run()
    assert not calls
    assert fused_loss == pytest.approx(peft_loss, rel=2e-2)
    for name, grad in fused_grads.items():
        reference = peft_grads[name]
        assert grad.abs().max() > 0
        assert (grad - reference).norm() <= 0.05 * reference.norm(), name  # bf16 rounding, not another gradient


def test_layers_an_engine_laid_out_still_train_through_the_fused_layer(llama, monkeypatch):
    """An engine (evaluate, chat) lays the linear layers out for oneDNN (infer/laid_out.py); the same
    model trained afterwards takes the fused LoRA layer on every adapted linear, with the same loss."""
    from tunesmith.infer import laid_out

    model, _ = build(llama, "lora")
    randomised_adapters(model)
    model.train()
    batch = fixed_batch(model.config.vocab_size)
    before, _ = loss_and_grads(model, batch)
    assert laid_out.lay_out(model) > 0
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert bases and all(laid_out.is_laid_out(b) for b in bases)
    calls = []
    real = fused_lora.LoraLinear.apply
    monkeypatch.setattr(fused_lora.LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    after, _ = loss_and_grads(model, batch)
    assert len(calls) == len(bases) and after == pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_the_function_matches_the_formula_in_plain_pytorch(with_dropout):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    x, weight, bias, a, b = leaf(7, 5), leaf(4, 5), leaf(4), leaf(3, 5), leaf(4, 3)
    weight.requires_grad_(False)
    mask = (torch.rand(7, 5, generator=generator) > 0.3).double() / 0.7
    dropped = x * mask if with_dropout else None
    scaling = 2.5
    fused = LoraLinear.apply(x, dropped, weight, bias, a, b, scaling)
    inner = x * mask if with_dropout else x
    reference = x @ weight.t() + bias + scaling * (inner @ a.t()) @ b.t()
    torch.testing.assert_close(fused, reference)
    upstream = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(fused, (x, bias, a, b), upstream)
    want = torch.autograd.grad(reference, (x, bias, a, b), upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(lambda x_, a_, b_: LoraLinear.apply(
        x_, x_ * mask if with_dropout else None, weight, bias, a_, b_, scaling), (x, a, b))


def test_cheap_dropout_drops_at_the_rate_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(400, 576)
    out = cheap_dropout(x, 0.1)
    dropped = float((out == 0).float().mean())
    assert dropped == pytest.approx(0.1, abs=0.005)
    assert float(out.mean()) == pytest.approx(1.0, abs=0.01)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 65536 / (65536 - round(0.1 * 65536))))
    assert cheap_dropout(x, 0.0) is x


def test_cheap_dropout_follows_the_seed_and_its_gradient_is_the_mask():
    x = torch.randn(50, 30, requires_grad=True)
    torch.manual_seed(5)
    first = cheap_dropout(x, 0.3)
    torch.manual_seed(5)
    second = cheap_dropout(x, 0.3)
    assert torch.equal(first, second)
    first.sum().backward()
    scale = 65536 / (65536 - round(0.3 * 65536))
    torch.testing.assert_close(x.grad, (first != 0).float() * scale)


def test_with_dropout_the_fused_layer_trains_like_peft(llama, monkeypatch):
    """Same dropout masks on both paths (the mask function patched to one fixed draw per call
    order), so the losses and gradients are equal; with dropout > 0 the fused path really drops."""
    model, _ = build(llama, "lora", lora={"dropout": 0.2})
    randomised_adapters(model)
    model.train()
    batch = fixed_batch(model.config.vocab_size)
    masks = []

    def recorded(x, p):
        out = cheap_dropout(x, p)
        masks.append(out != 0)
        return out

    monkeypatch.setattr(fused_lora, "cheap_dropout", recorded)
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert masks and 0.1 < 1 - float(torch.cat([m.flatten() for m in masks]).float().mean()) < 0.3
    replay = iter(masks)

    def replayed_dropout(self, x):
        return x * next(replay).view(x.shape).to(x.dtype) / (1 - self.p)

    use_fused_lora(model, on=False)
    monkeypatch.setattr(torch.nn.Dropout, "forward", replayed_dropout)
    peft_loss, peft_grads = loss_and_grads(model, batch)
    assert fused_loss == pytest.approx(peft_loss, abs=1e-4)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_disabled_adapters_and_autocast_take_peft_path(llama, monkeypatch):
    model, _ = build(llama, "lora")
    randomised_adapters(model)
    calls = []
    real = fused_lora.LoraLinear.apply
    monkeypatch.setattr(fused_lora.LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        assert not calls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert not calls
        on = model(input_ids=ids).logits
    assert calls
    base = type(model.get_base_model())
    assert base is not None and not torch.allclose(on, off)  # the adapters really act on the fused path
