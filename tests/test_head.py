"""The output layer's oneDNN copy (infer/head.py) against the layer's own multiply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.infer import head

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")


class Head(torch.nn.Module):
    def __init__(self, hidden: int = 64, vocab: int = 65536, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=bias, dtype=dtype)  # 16 MiB in fp32: MIN_BYTES

    def get_output_embeddings(self):
        return self.lm_head


def _zero_copy(layer: torch.nn.Linear) -> None:
    """A copy that is visibly not the weight: where it is used, the output is the bias alone."""
    head.COPIES[layer].weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), 8)


@pytest.mark.parametrize("bias", [False, True])
def test_the_copy_gives_the_layers_own_output(bias):
    model = Head(bias=bias)
    assert head.lay_out(model) and type(model.lm_head) is head.LaidOutLinear and model.lm_head in head.COPIES
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, 64, generator=generator) for rows in (1, 8, 33, head.MAX_ROWS)]
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
    assert head.lay_out(model)
    _zero_copy(model.lm_head)
    layer, hidden = model.lm_head, torch.randn(4, 64)
    out = layer(hidden)  # autograd on: training uses the weight, and its gradient flows
    out.sum().backward()
    assert out.abs().max() > 0 and layer.weight.grad is not None and layer.weight.grad.abs().max() > 0
    with torch.no_grad():
        assert layer(torch.randn(head.MAX_ROWS + 1, 64)).abs().max() > 0  # more rows than the copy is for
        layer.weight.mul_(2)  # an optimizer step: the copy is stale
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # another tensor altogether
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias))
        assert head.lay_out(model)  # laid out afresh: the copy is the new weight's
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight.data.add_(1)  # an edit that moves no version (PEFT's merge): the next lay_out sees it
        assert head.lay_out(model)
        torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_no_copy_for_a_small_or_half_precision_layer():
    small, half = Head(vocab=1000), Head(dtype=torch.bfloat16)
    assert not head.lay_out(small) and not head.lay_out(half)
    assert type(small.lm_head) is torch.nn.Linear and type(half.lm_head) is torch.nn.Linear


def test_the_engine_answers_as_transformers_with_the_copy_in_use(tiny_models, monkeypatch):
    from tunesmith.infer.engine import Request, Sampling, decode
    from tunesmith.infer.generate import load_base

    monkeypatch.setattr(head, "MIN_BYTES", 0)  # the tiny model's output layer is small
    used = []
    applies = head.Copy.applies
    monkeypatch.setattr(head.Copy, "applies", lambda self, layer, hidden: used.append(applies(self, layer, hidden))
                        or used[-1])
    loaded = load_base(str(tiny_models("llama")), device="cpu", precision="fp32")
    prompts = [[5, 9, 13, 21], [7, 8], [30, 31, 32, 33, 34, 35]]
    requests = [Request(list(ids), Sampling(max_new_tokens=8)) for ids in prompts]
    decode(loaded.model, loaded.tokenizer, requests, stop_ids=[], pad_id=loaded.tokenizer.pad_token_id or 0)
    assert type(loaded.model.get_output_embeddings()) is head.LaidOutLinear
    assert sum(used) >= 8  # every decode pass's logits came through the copy
    head.drop(loaded.model)  # the reference: transformers with the layer's own weight
    assert type(loaded.model.get_output_embeddings()) is torch.nn.Linear
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
    assert head.lay_out(model)
    twin = copy.deepcopy(model)
    assert type(twin.lm_head) is head.LaidOutLinear and twin.lm_head not in head.COPIES
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
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and loaded.lm_head not in head.COPIES
    assert set(model.state_dict()) == {"lm_head.weight", "lm_head.bias"}
