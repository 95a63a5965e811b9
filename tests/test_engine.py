"""The token loop of chat and serve against transformers' own generate and logits processors."""

from __future__ import annotations

import pytest
import torch

from tunesmith.infer.engine import Request, Sampling, _safe_end, _top_p, decode
from tunesmith.infer.generate import load_base, stop_token_ids

PROMPTS = ["hello world", "What is the capital of France? The capital", "the quick brown fox jumps over the lazy dog"]


def _loaded(tiny_models, family):
    return load_base(str(tiny_models(family)), device="cpu", precision="fp32")


def _ids(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(loaded, requests):
    decode(loaded.model, loaded.tokenizer, requests, stop_token_ids(loaded), loaded.tokenizer.pad_token_id)
    return requests


def _reference(loaded, ids, max_new_tokens, penalty=1.0):
    """transformers' greedy generate on one unpadded prompt, stop tokens dropped."""
    stops = stop_token_ids(loaded)
    output = loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=penalty,
                                   eos_token_id=stops, pad_token_id=loaded.tokenizer.pad_token_id)
    return [t for t in output[0, len(ids):].tolist() if t not in stops]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_greedy_equals_transformers_generate(tiny_models, family, penalty):
    """Three prompts of different lengths decoded together (left padding, rows leaving the batch)
    give token for token what generate gives each prompt alone."""
    loaded = _loaded(tiny_models, family)
    lengths = [5, 9, 14]  # rows finish at different steps, so the cache is pruned mid-way
    requests = [Request(_ids(loaded, p), Sampling(max_new_tokens=n, repetition_penalty=penalty))
                for p, n in zip(PROMPTS, lengths)]
    for request, n in zip(_run(loaded, requests), lengths):
        expected = _reference(loaded, request.prompt_ids, n, penalty)
        assert request.completion_ids == expected
        assert request.finish_reason == ("length" if len(expected) == n else "stop")
        assert request.text == loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_top_k_one_is_greedy_and_seeds_repeat(tiny_models):
    loaded = _loaded(tiny_models, "qwen2")
    ids = _ids(loaded, PROMPTS[1])
    greedy, top1 = _run(loaded, [Request(ids, Sampling(max_new_tokens=10)),
                                 Request(ids, Sampling(max_new_tokens=10, temperature=1.0, top_k=1, seed=3))])
    assert top1.completion_ids == greedy.completion_ids
    first, again, other = _run(loaded, [Request(ids, Sampling(max_new_tokens=12, temperature=1.5, seed=s))
                                        for s in (7, 7, 8)])
    assert first.completion_ids == again.completion_ids  # the seed fixes the answer, batched or not
    assert first.completion_ids != other.completion_ids  # a random model at temperature 1.5 varies


def test_top_p_keeps_what_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        logits = torch.randn(400, generator=generator) * 3
        ours = torch.isfinite(_top_p(logits, top_p))
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits[None].clone())[0])
        assert torch.equal(ours, theirs), top_p


def test_stop_strings_cut_the_answer_and_never_stream(tiny_models):
    loaded = _loaded(tiny_models, "qwen2")
    ids = _ids(loaded, PROMPTS[0])
    [full] = _run(loaded, [Request(ids, Sampling(max_new_tokens=16))])
    stop = full.text[5:8]  # a string the greedy answer is known to contain
    assert stop and stop in full.text
    pieces: list[str] = []
    [cut] = _run(loaded, [Request(ids, Sampling(max_new_tokens=16, stop=(stop,)), on_text=pieces.append)])
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text  # streamed pieces add up to the answer, the stop never shown


def test_streamed_pieces_add_up_and_hold_back_partial_characters(tiny_models):
    loaded = _loaded(tiny_models, "qwen2")
    pieces: list[str] = []
    [request] = _run(loaded, [Request(_ids(loaded, PROMPTS[2]), Sampling(max_new_tokens=20), on_text=pieces.append)])
    assert "".join(pieces) == request.text and len(pieces) > 1
    assert _safe_end("abc\ufffd", ()) == 3  # half a UTF-8 character waits for its other bytes
    assert _safe_end("answer: ###", ("####",)) == len("answer: ")  # may become the stop string
    assert _safe_end("answer: #x", ("##",)) == len("answer: #x")


def test_cancelled_request_leaves_the_batch(tiny_models):
    loaded = _loaded(tiny_models, "qwen2")
    ids = _ids(loaded, PROMPTS[1])

    def cancel_after_three(piece):
        if len(cancelled.completion_ids) >= 3:
            cancelled.cancelled = True

    cancelled = Request(ids, Sampling(max_new_tokens=30), on_text=cancel_after_three)
    kept = Request(ids, Sampling(max_new_tokens=30))
    _run(loaded, [cancelled, kept])
    assert cancelled.finish_reason == "cancelled" and len(cancelled.completion_ids) <= 4
    assert kept.completion_ids == _reference(loaded, ids, 30)  # the other row is unaffected


def test_sampling_settings_are_checked():
    assert Sampling().problems() == []
    problems = Sampling(max_new_tokens=0, temperature=3, top_p=0, top_k=-1, repetition_penalty=0, stop=("",)).problems()
    assert len(problems) == 6 and problems[0].startswith("max_new_tokens=0")
