"""The loss: chunked cross-entropy equals F.cross_entropy, and the packed loss of a micro batch
equals plain transformers' per-example loss summed over supervised tokens, for every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES

from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.batching import pack
from tunesmith.train.kernels import packed_attention
from tunesmith.train.loss import chunked_cross_entropy, logit_transform, loss_sum


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_f_cross_entropy(chunk_size, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)  # (n, d)
    layer = torch.nn.Linear(16, 50, bias=with_bias)
    targets = torch.randint(0, 50, (37,))

    ours = chunked_cross_entropy(hidden, layer, targets, chunk_size=chunk_size)
    our_grads = torch.autograd.grad(ours, [hidden, *layer.parameters()])
    reference = F.cross_entropy(layer(hidden), targets, reduction="sum")
    reference_grads = torch.autograd.grad(reference, [hidden, *layer.parameters()])

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(our_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the no-grad path (validation) gives the same value
        no_grad = chunked_cross_entropy(hidden, layer, targets, chunk_size=chunk_size)
        torch.testing.assert_close(no_grad, reference, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_applies_the_logit_transform():
    torch.manual_seed(1)
    hidden, layer, targets = torch.randn(9, 8), torch.nn.Linear(8, 20), torch.randint(0, 20, (9,))

    class Config:
        final_logit_softcapping = 2.0
        logit_scale = 3.0

    transform = logit_transform(Config())
    ours = chunked_cross_entropy(hidden, layer, targets, transform, chunk_size=4)
    logits = torch.tanh(layer(hidden) * 3.0 / 2.0) * 2.0
    torch.testing.assert_close(ours, F.cross_entropy(logits, targets, reduction="sum"), rtol=1e-5, atol=1e-5)


def varied_split(vocab_size: int, seed: int = 0) -> TokenizedSplit:
    """Three examples of different lengths; each with a masked prompt and supervised answer."""
    generator = torch.Generator().manual_seed(seed)
    ids, supervised = [], []
    for prompt_length, answer_length in ((5, 3), (11, 6), (3, 9)):
        length = prompt_length + answer_length
        ids.append(torch.randint(3, vocab_size, (length,), generator=generator).tolist())
        supervised.append([False] * prompt_length + [True] * answer_length)
    return TokenizedSplit.from_lists(ids, supervised)


def plain_transformers_loss(model, split: TokenizedSplit) -> torch.Tensor:
    """Each example alone through model(input_ids, labels=...), mean loss × its target count."""
    total = torch.zeros(())
    for index in range(len(split)):
        ids, supervised = split.example(index)
        labels = torch.where(supervised, ids, torch.full_like(ids, -100))
        n_targets = int((labels[1:] != -100).sum())
        total = total + model(input_ids=ids[None], labels=labels[None]).loss * n_targets
    return total


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_equals_plain_transformers_loss(tiny_models, family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models(family), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()  # no dropout (gpt2 has some), so both sides see the same network; gradients still flow
    split = varied_split(model.config.vocab_size)
    batch = pack(split, [0, 1, 2])
    assert batch.n_targets == int(split.target_counts().sum()) == 3 + 6 + 9  # every answer token

    with packed_attention(model):
        packed = loss_sum(model, batch, chunk_size=16)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()), allow_unused=True)
    reference = plain_transformers_loss(model, split)
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)

    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-4)
    checked = 0
    for (name, _), got, expected in zip(model.named_parameters(), packed_grads, reference_grads):
        if expected is None:
            continue
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked > 10
    # the model's own attention setting is restored after the packed forward
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["gemma3", "mistral", "qwen2"])
def test_packed_loss_honours_a_sliding_window_shorter_than_the_examples(tiny_models, family, tmp_path):
    """Gemma 3's local layers, Mistral and Qwen2 with a window: a token sees only the last `window`
    tokens. The examples (8, 17 and 12 tokens) are longer than the window of 4."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / family
    shutil.copytree(tiny_models(family), folder)
    config = json.loads((folder / "config.json").read_text())
    window = {"sliding_window": 4} | ({"use_sliding_window": True, "max_window_layers": 0,
                                      "layer_types": ["sliding_attention"] * config["num_hidden_layers"]}
                                     if family == "qwen2" else {})
    (folder / "config.json").write_text(json.dumps(config | window))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    split = varied_split(model.config.vocab_size)
    with packed_attention(model):
        packed = loss_sum(model, pack(split, [0, 1, 2]), chunk_size=16)
    reference = plain_transformers_loss(model, split)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-4)
    full_context = AutoModelForCausalLM.from_pretrained(tiny_models(family), dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    assert abs(plain_transformers_loss(full_context, split).item() - reference.item()) > 1e-3  # the window matters


def test_packing_layout():
    split = TokenizedSplit.from_lists([[10, 11, 12, 13], [20, 21, 22]],
                                      [[False, False, True, True], [False, True, True]])
    batch = pack(split, [1, 0])
    assert batch.input_ids.tolist() == [[20, 21, 22, 10, 11, 12, 13]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch.segments == [(0, 3), (3, 7)]
    assert batch.predict_at.tolist() == [0, 1, 4, 5]  # never across the example boundary
    assert batch.targets.tolist() == [21, 22, 12, 13]
    assert split.target_counts().tolist() == [2, 2]

