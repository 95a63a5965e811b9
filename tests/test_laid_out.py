"""The linear layers' oneDNN copies (infer/laid_out.py) against each layer's own multiply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.infer import laid_out

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")


class Head(torch.nn.Module):
    def __init__(self, hidden: int = 64, vocab: int = 65536, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=bias, dtype=dtype)

    def get_output_embeddings(self):
        return self.lm_head


def _zero_copy(layer: torch.nn.Linear) -> None:
    """A copy that is visibly not the weight: where it is used, the output is the bias alone."""
    laid_out.COPIES[layer].weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), 8)


@pytest.mark.parametrize("bias", [False, True])
def test_the_copy_gives_the_layers_own_output(bias):
    model = Head(bias=bias)
    assert laid_out.lay_out(model) and type(model.lm_head) is laid_out.LaidOutLinear and model.lm_head in laid_out.COPIES
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, 64, generator=generator) for rows in (1, 8, 33, laid_out.MAX_ROWS)]
    inputs.append(torch.randn(3, 10, 64, generator=generator)[:, [2, 5, 9], :])  # the engine's kept columns
    with torch.no_grad():
        for hidden in inputs:
            expected = F.linear(hidden, model.lm_head.weight, model.lm_head.bias)
            torch.testing.assert_close(model.lm_head(hidden), expected, rtol=1e-5, atol=1e-5)
        _zero_copy(model.lm_head)
        for hidden in inputs:  # ... and it was the copy that gave it
            assert model.lm_head(hidden).abs().max() == (model.lm_head.bias.abs().max() if bias else 0)


def test_the_layer_multiplies_by_its_weight_where_the_copy_does_not_apply():
    model = Head(bias=True)
    assert laid_out.lay_out(model)
    _zero_copy(model.lm_head)
    layer, hidden = model.lm_head, torch.randn(4, 64)
    out = layer(hidden)  # autograd on: training uses the weight, and its gradient flows
    out.sum().backward()
    assert out.abs().max() > 0 and layer.weight.grad is not None and layer.weight.grad.abs().max() > 0
    with torch.no_grad():
        assert layer(torch.randn(laid_out.MAX_ROWS + 1, 64)).abs().max() > 0  # more rows than the copy is for
        layer.weight.mul_(2)  # an optimizer step: the copy is stale
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # another tensor altogether
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias))
        assert laid_out.lay_out(model)  # laid out afresh: the copy is the new weight's
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight.data.add_(1)  # an edit that moves no version (PEFT's merge): the next lay_out sees it
        assert laid_out.lay_out(model)
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_bf16_layers_get_a_copy_too_and_fp16_ones_do_not():
    model = Head(vocab=1000, bias=True, dtype=torch.bfloat16)
    assert laid_out.lay_out(model) == 1 and type(model.lm_head) is laid_out.LaidOutLinear
    hidden = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, model.lm_head.weight, model.lm_head.bias))
        _zero_copy(model.lm_head)
        assert torch.equal(model.lm_head(hidden), model.lm_head.bias.expand(8, -1))  # the copy gave it
    half = Head(dtype=torch.float16)
    assert laid_out.lay_out(half) == 0 and type(half.lm_head) is torch.nn.Linear


class Body(Head):
    def __init__(self):
        super().__init__(vocab=4096)
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)


def test_the_copies_stay_within_their_memory_budget_output_layer_first(monkeypatch):
    model = Body()
    assert laid_out.lay_out(model) == 3 and all(laid_out.is_laid_out(m) for m in (model.lm_head, model.up, model.down))
    monkeypatch.setattr(laid_out, "MAX_BYTES", 4096 * 64 * 4 + 256 * 64 * 4)  # the output layer and one more
    assert laid_out.lay_out(model) == 2
    assert laid_out.is_laid_out(model.lm_head) and laid_out.is_laid_out(model.up)
    assert type(model.down) is torch.nn.Linear and model.down not in laid_out.COPIES  # dropped, not stale
    laid_out.drop(model)
    assert all(type(m) is torch.nn.Linear and m not in laid_out.COPIES for m in (model.lm_head, model.up, model.down))


def test_the_engine_answers_as_transformers_with_the_copy_in_use(tiny_models, monkeypatch):
    from tunesmith.infer.engine import Request, Sampling, decode
    from tunesmith.infer.generate import load_base

    used = []
    applies = laid_out.Copy.applies
    monkeypatch.setattr(laid_out.Copy, "applies", lambda self, layer, hidden: used.append(applies(self, layer, hidden))
                        or used[-1])
    loaded = load_base(str(tiny_models("llama")), device="cpu", precision="fp32")
    prompts = [[5, 9, 13, 21], [7, 8], [30, 31, 32, 33, 34, 35]]
    requests = [Request(list(ids), Sampling(max_new_tokens=8)) for ids in prompts]
    decode(loaded.model, loaded.tokenizer, requests, stop_ids=[], pad_id=loaded.tokenizer.pad_token_id or 0)
    linear = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1 + 7 * loaded.model.config.num_hidden_layers and all(map(laid_out.is_laid_out, linear))
    assert sum(used) >= 8 * len(linear)  # every decode pass went through the copies
    laid_out.drop(loaded.model)  # the reference: transformers with the layers' own weights
    assert all(type(m) is torch.nn.Linear for m in linear)
    for ids, request in zip(prompts, requests, strict=True):
        with torch.no_grad():
            expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                             pad_token_id=0)[0, len(ids):].tolist()
        assert request.completion_ids == expected


def test_a_copied_or_saved_model_is_a_plain_one():
    """deepcopy and torch.save see no oneDNN tensor; the copied layer multiplies by its own weight,
    which the copy may since have changed."""
    import copy
    import io

    model = Head(bias=True)
    assert laid_out.lay_out(model)
    twin = copy.deepcopy(model)
    assert type(twin.lm_head) is laid_out.LaidOutLinear and twin.lm_head not in laid_out.COPIES
    with torch.no_grad():
        twin.lm_head.weight.data.mul_(3)  # a copy's weight moves on; the original's copy must not follow
        hidden = torch.randn(4, 64)
        assert torch.equal(twin.lm_head(hidden), F.linear(hidden, twin.lm_head.weight, twin.lm_head.bias))
        torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, model.lm_head.weight, model.lm_head.bias),
                                   rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and loaded.lm_head not in laid_out.COPIES
    assert set(model.state_dict()) == {"lm_head.weight", "lm_head.bias"}
