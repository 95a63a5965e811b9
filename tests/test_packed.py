"""One forward pass for a decode step and a prefill chunk (infer/packed.py) against transformers'
own passes, one per part."""

from __future__ import annotations

import pytest
import torch

from tunesmith.infer.engine import _cache, _layers
from tunesmith.infer.generate import load_base
from tunesmith.infer.packed import Part, packable, packed_forward


def _left_padded(lengths: list[int], vocab: int, generator: torch.Generator, before: int = 0):
    """Ids (rows, width) left-padded, and the mask (rows, before + width) whose first `before`
    columns (a shared prefix already in the cache) are real."""
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), before + width), dtype=torch.long)
    mask[:, :before] = 1
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(5, vocab, (length,), generator=generator)
        mask[row, before + width - length:] = 1
    return ids, mask


def _positions(mask: torch.Tensor, columns: int) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -columns:]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_pass_gives_each_part_the_logits_and_cache_of_its_own_pass(tiny_models, family):
    """Three running rows (left-padded, one new token each) and two prompts after a shared prefix
    (so their mask has a hole of padding between the prefix and each prompt) in one pass: every
    real column's logits, and every cache column, equal those of a separate pass per part."""
    model = load_base(str(tiny_models(family)), device="cpu", precision="fp32").model
    _assert_packed_equals_separate(model)


def test_a_packed_pass_runs_peft_adapters_one_at_a_time_or_named(tiny_models):
    """A PEFT model with two LoRA adapters (random, non-zero): the active adapter, an adapter named
    for the pass, and a different adapter for each row, give the logits and caches of separate
    passes."""
    from peft import LoraConfig, get_peft_model

    model = load_base(str(tiny_models("llama")), device="cpu", precision="fp32").model
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="first")
    model.add_adapter("second", lora)
    model.eval()
    with torch.inference_mode(), model.disable_adapter():
        plain = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    with torch.inference_mode():
        adapted = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert not torch.allclose(plain, adapted, atol=1e-3)  # the adapter changes the answers
    _assert_packed_equals_separate(model)
    _assert_packed_equals_separate(model, adapter_names=["second"])
    # rows of different adapters in one pass, the base model's too: each token goes through its row's
    _assert_packed_equals_separate(model, names=(["first", "second", "__base__"], ["second", "first"]))


def _assert_packed_equals_separate(model, names: tuple[list[str], list[str]] | None = None, **forward_kwargs):
    """The three running rows and two prefixed prompts above, packed and apart. `names`: each
    running row's and each prompt's own adapter (a PEFT model serving several at once)."""
    assert packable(model)
    vocab, generator = model.config.vocab_size, torch.Generator().manual_seed(0)
    prompts, prompts_mask = _left_padded([5, 3, 7], vocab, generator)
    prefix = torch.randint(5, vocab, (1, 4), generator=generator)
    chunk, chunk_mask = _left_padded([2, 6], vocab, generator, before=prefix.shape[1])
    tokens = torch.randint(5, vocab, (3, 1), generator=generator)
    decode_mask = torch.cat([prompts_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)

    def per_row(rows: int) -> dict:
        if names is not None:
            return {"adapter_names": names[0] if rows == 3 else names[1]}
        return {key: value * rows for key, value in forward_kwargs.items()}  # adapter_names: one per row

    def caches():
        """The running rows' cache (their prompts read) and the prompts' (the prefix read)."""
        running, prefilling = _cache([]), _cache([])
        model(input_ids=prompts, attention_mask=prompts_mask, position_ids=_positions(prompts_mask, 7),
              past_key_values=running, use_cache=True, **per_row(3))
        model(input_ids=prefix.expand(2, -1), position_ids=torch.arange(4)[None].expand(2, -1),
              past_key_values=prefilling, use_cache=True, **per_row(2))
        return running, prefilling

    with torch.inference_mode():
        running, prefilling = caches()
        decoded = model(input_ids=tokens, attention_mask=decode_mask, position_ids=_positions(decode_mask, 1),
                        past_key_values=running, use_cache=True, **per_row(3)).logits[:, -1:]
        read = model(input_ids=chunk, attention_mask=chunk_mask, position_ids=_positions(chunk_mask, 6),
                     past_key_values=prefilling, use_cache=True, **per_row(2)).logits[:, -2:]
        packed_running, packed_prefilling = caches()
        got_decoded, got_read = packed_forward(model, [
            Part(tokens, decode_mask, _positions(decode_mask, 1), packed_running, adapters=names and names[0]),
            Part(chunk, chunk_mask, _positions(chunk_mask, 6), packed_prefilling, keep=2,
                 adapters=names and names[1])], **forward_kwargs)
    torch.testing.assert_close(got_decoded, decoded, rtol=1e-5, atol=1e-5)
    real = chunk_mask[:, -2:].bool()  # the first prompt's second-last column is padding
    assert real.sum() == 4
    torch.testing.assert_close(got_read[real], read[real], rtol=1e-5, atol=1e-5)
    for cache, expected, mask in ((packed_running, running, decode_mask), (packed_prefilling, prefilling, chunk_mask)):
        for (keys, values), (want_keys, want_values) in zip(_layers(cache), _layers(expected), strict=True):
            assert keys.shape == want_keys.shape and keys.shape[2] == mask.shape[1]
            real_columns = mask.bool()[:, None, :, None]
            torch.testing.assert_close(keys * real_columns, want_keys * real_columns, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values * real_columns, want_values * real_columns, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # switched back after the pass


def test_models_the_packed_pass_does_not_know_are_read_one_pass_per_part(tiny_models):
    """A sliding-window model, and any attention other than SDPA on a CPU, keeps a pass per part."""
    gemma3 = load_base(str(tiny_models("gemma3")), device="cpu", precision="fp32").model
    assert not packable(gemma3)  # some of its layers attend a window only
    llama = load_base(str(tiny_models("llama")), device="cpu", precision="fp32").model
    assert packable(llama)
    llama.config._attn_implementation = "eager"
    try:
        assert not packable(llama)
    finally:
        llama.config._attn_implementation = "sdpa"
