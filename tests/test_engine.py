"""The token loop of chat and serve against transformers' own generate and logits processors."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.infer.engine import Request, Sampling, decode
from tunesmith.infer.generate import load_base, stop_token_ids
from tunesmith.infer.request import safe_end as _safe_end

PROMPTS = ["hello world", "What is the capital of France? The capital", "the quick brown fox jumps over the lazy dog"]


def _loaded(tiny_models, family):
    return load_base(str(tiny_models(family)), device="cpu", precision="fp32")


def _ids(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(loaded, requests):
    decode(loaded.model, loaded.tokenizer, requests, stop_token_ids(loaded), loaded.tokenizer.pad_token_id)
    return requests


def _reference(loaded, ids, max_new_tokens, penalty=1.0):
    """transformers' greedy generate on one unpadded prompt, stopping at (and dropping) the
    tokenizer's end-of-sequence token, not at tunesmith's own list of stop ids."""
    stops = [loaded.tokenizer.eos_token_id]
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


def _engine_run(engine, loaded, schedule: dict[int, list[Request]], steps_limit: int = 500) -> list[list[int]]:
    """Step the engine, admitting schedule[step] before that step; the running rows' token counts per step."""
    from tunesmith.infer.engine import Engine  # noqa: F401 — the engine under test

    trace, step = [], 0
    while (any(s >= step for s in schedule) or engine.busy) and step < steps_limit:
        for request in schedule.get(step, []):
            engine.admit(request, loaded.tokenizer, stop_token_ids(loaded))
        engine.step()
        trace.append([len(r.completion_ids) for rs in schedule.values() for r in rs])
        step += 1
    return trace


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_requests_join_the_running_batch_and_keep_their_greedy_answers(tiny_models, family):
    """Requests admitted while others decode start at the next step (not when the batch ends), long
    prompts are prefilled in chunks, finished rows leave; every answer is still generate's."""
    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, family)
    long_prompt = " ".join(PROMPTS * 2)
    first = Request(_ids(loaded, PROMPTS[0]), Sampling(max_new_tokens=20))
    joiner = Request(_ids(loaded, PROMPTS[1]), Sampling(max_new_tokens=6))
    chunked = Request(_ids(loaded, long_prompt), Sampling(max_new_tokens=8))
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id, prefill_tokens=8)
    trace = _engine_run(engine, loaded, {0: [first], 3: [joiner], 5: [chunked]})
    # the joiner answered its first token once its prompt was read (8 tokens a step), from step 3 on,
    # while the first request was still decoding
    joined = 3 + math.ceil(len(joiner.prompt_ids) / 8) - 1
    assert trace[joined][1] >= 1 and trace[joined - 1][1] == 0 and trace[joined][0] < len(first.completion_ids)
    # the long prompt took several steps to read; the first request got a token at every one of them
    chunk_steps = len(chunked.prompt_ids) // 8
    assert chunk_steps >= 3 and joined < 5
    assert [row[0] for row in trace[5:5 + chunk_steps]] == list(range(trace[4][0] + 1, trace[4][0] + 1 + chunk_steps))
    for request in (first, joiner, chunked):
        assert request.completion_ids == _reference(loaded, request.prompt_ids, request.sampling.max_new_tokens)
    assert engine.running is None and engine.size == 0


def test_a_finished_row_leaves_the_cache_at_once(tiny_models):
    from tunesmith.infer.engine import Engine, _layers

    loaded = _loaded(tiny_models, "qwen2")
    short = Request(_ids(loaded, PROMPTS[2]), Sampling(max_new_tokens=2))
    long = Request(_ids(loaded, PROMPTS[0]), Sampling(max_new_tokens=12))
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    _engine_run(engine, loaded, {0: [short, long]}, steps_limit=2)
    assert short.finish_reason == "length" and long.finish_reason is None
    keys, _ = _layers(engine.running.cache)[0]
    assert engine.running.rows[0].request is long and keys.shape[0] == 1  # one row left in the cache
    # the columns only the long prompt of the finished row needed are gone too
    assert len(short.prompt_ids) > len(long.prompt_ids)
    fed = len(long.prompt_ids) + len(long.completion_ids) - 1  # the newest token is fed at the next step
    assert keys.shape[2] == engine.running.width == fed


def test_text_is_decoded_incrementally_not_again_per_token(tiny_models, monkeypatch):
    loaded = _loaded(tiny_models, "qwen2")
    calls = []
    decode_whole = loaded.tokenizer.decode
    monkeypatch.setattr(loaded.tokenizer, "decode", lambda *a, **k: calls.append(1) or decode_whole(*a, **k))
    pieces: list[str] = []
    [request] = _run(loaded, [Request(_ids(loaded, PROMPTS[2]), Sampling(max_new_tokens=24), on_text=pieces.append)])
    assert len(request.completion_ids) == 24 and "".join(pieces) == request.text
    assert len(calls) <= 1  # once, at the end, for the exact final text


def test_a_failing_decode_step_is_retried_without_the_offending_row(tiny_models, monkeypatch):
    """The model raises whenever a decode step reaches position 48: only the long-prompt request
    gets there. It fails alone; the rows sharing its batch get exactly their greedy answers."""
    import functools

    loaded = _loaded(tiny_models, "qwen2")
    forward = loaded.model.forward

    @functools.wraps(forward)
    def poisoned(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1 and int(kwargs["position_ids"].max()) >= 48:
            raise RuntimeError("poisoned step")
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", poisoned)
    poison_ids = _ids(loaded, " ".join(PROMPTS))
    assert len(poison_ids) < 48
    good = [Request(_ids(loaded, p), Sampling(max_new_tokens=8)) for p in PROMPTS]
    bad_seed = Request(_ids(loaded, PROMPTS[0]), Sampling(max_new_tokens=8, temperature=1.0, seed=2**70))
    poison = Request(poison_ids, Sampling(max_new_tokens=20))
    with pytest.raises(ValueError, match="Overflow"):  # the first failure (the seed), once all are done
        _run(loaded, [good[0], bad_seed, good[1], poison, good[2]])
    assert poison.finish_reason == "error" and "poisoned step" in str(poison.error)
    assert bad_seed.finish_reason == "error"
    assert 48 - len(poison_ids) <= len(poison.completion_ids) <= 48 - len(poison_ids) + 1
    monkeypatch.setattr(loaded.model, "forward", forward)
    for request in good:
        assert request.error is None
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 8)


def test_nucleus_keeps_what_transformers_top_k_and_top_p_keep():
    """Sampling looks for the top-p nucleus among the most likely tokens first; what it keeps is
    exactly what transformers' TopK and TopP warpers keep, and a nucleus wider than the candidates
    falls back to those warpers over the whole vocabulary."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from tunesmith.infer.request import nucleus as _nucleus

    generator = torch.Generator().manual_seed(0)
    for top_k, top_p in [(0, 0.1), (0, 0.5), (0, 0.9), (50, 0.9), (5, 0.99), (3000, 0.5)]:
        logits = torch.randn(3, 4000, generator=generator) * 4
        expected = TopKLogitsWarper(top_k)(None, logits.clone()) if top_k else logits.clone()
        expected = TopPLogitsWarper(top_p)(None, expected)
        found = _nucleus(logits, top_k, top_p)
        if top_k > 256:
            assert found is None
            continue
        ids, weights = found
        for row in range(3):
            assert set(ids[row][weights[row] > 0].tolist()) == set(torch.isfinite(expected[row]).nonzero().flatten().tolist())
    assert _nucleus(torch.zeros(2, 4000), 0, 0.9) is None  # a flat distribution: 3600 tokens in the nucleus


def _count_prefill_columns(monkeypatch, model) -> list[int]:
    """A list that gets the columns of every prompt chunk the model reads from now on (one entry a
    forward pass of more than one column; in a packed pass, the prefill's part)."""
    import functools

    read: list[int] = []
    forward = model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        packed = kwargs.get("tunesmith_packed")  # a prefill chunk in the running rows' decode pass: its columns
        if kwargs["input_ids"].shape[1] > 1:
            read.append(kwargs["input_ids"].shape[1] if packed is None else packed.parts[-1].ids.shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return read


def test_prompts_that_begin_alike_share_the_prefill_of_that_beginning(tiny_models, monkeypatch):
    """A chat template's system block is read once: prompts starting with it are prefilled from
    where they differ, and still get generate's greedy answers."""
    from tunesmith.infer.engine import Engine, _common_prefix
    from tunesmith.infer.prompt_cache import MIN_MATCH

    loaded = _loaded(tiny_models, "qwen2")
    system = "Below is an instruction that describes a task. Write a response. "
    prompts = [system + question for question in ("hello world", "the quick brown fox", "red green blue")]
    requests = [Request(_ids(loaded, p), Sampling(max_new_tokens=6)) for p in prompts]
    shared = len(_common_prefix([r.prompt_ids for r in requests]))  # the system text, but its last space
    assert shared >= MIN_MATCH
    read = _count_prefill_columns(monkeypatch, loaded.model)
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    _engine_run(engine, loaded, {0: requests[:2], 4: requests[2:]})
    # the first two arrive together: their common beginning is read once, then each one's rest;
    # the third, later, is read from where it differs
    assert read == [shared, max(len(r.prompt_ids) for r in requests[:2]) - shared,
                    len(requests[2].prompt_ids) - shared]
    for request in requests:
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 6)


def _prefill_chunks(monkeypatch) -> list[tuple[int, int]]:
    """A list that gets (rows, columns) of every prefill chunk the engine reads from now on."""
    from tunesmith.infer.engine import Engine

    chunks: list[tuple[int, int]] = []
    part_of = Engine._prefill_part

    def recording(self, prefill):
        part, end, read_from = part_of(self, prefill)
        chunks.append(tuple(part.ids.shape))
        return part, end, read_from

    monkeypatch.setattr(Engine, "_prefill_part", recording)
    return chunks


def _cached_length(request: Request) -> int:
    """Tokens a finished request held in the cache: its prompt and the answer tokens fed back (a last
    token taken for max_new_tokens was never fed; an end-of-turn token is not in the answer)."""
    return len(request.prompt_ids) + len(request.completion_ids) - (request.finish_reason == "length")


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_a_prompt_read_before_is_not_read_again(tiny_models, monkeypatch, family):
    """The same prompt again reads only its last token, in a decode pass; a chat's next turn (the
    previous prompt, its answer, a new message) reads only what is new. The answers are still
    generate's."""
    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, family)
    prompt = _ids(loaded, "Below is an instruction that describes a task. Write a response. hello world")
    first = Request(prompt, Sampling(max_new_tokens=6))
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    chunks = _prefill_chunks(monkeypatch)
    _engine_run(engine, loaded, {0: [first]})
    again = Request(list(prompt), Sampling(max_new_tokens=6))
    _engine_run(engine, loaded, {0: [again]})
    score = _ids(loaded, " the capital of France")  # read with the prompt: its log-likelihood checks every logit
    follow_up = Request(prompt + first.completion_ids + _ids(loaded, " and the quick brown fox"),
                        Sampling(max_new_tokens=6), score_ids=score)
    _engine_run(engine, loaded, {0: [follow_up]})
    # the same prompt: all but its last token cached, which is fed as a decode step's (no prefill chunk)
    assert chunks == [(1, len(prompt)), (1, len(follow_up.prompt_ids) - _cached_length(first) + len(score))]
    assert engine.prompts.hits == 2
    for request in (first, again, follow_up):
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 6)
    logprob, _ = _log_likelihood(loaded, follow_up.prompt_ids, score, [True] * len(score))
    assert follow_up.score_logprob == pytest.approx(logprob, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_a_cached_prompt_joins_the_running_rows_without_a_prefill(tiny_models, monkeypatch, family):
    """A prompt read before, arriving while another request decodes, goes straight into the running
    batch (its last token fed in their pass): no prefill chunk is read for it, and both answers are
    still generate's."""
    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, family)
    prompt = _ids(loaded, "Below is an instruction that describes a task. Write a response. hello world")
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    _engine_run(engine, loaded, {0: [Request(prompt, Sampling(max_new_tokens=6))]})
    running = Request(_ids(loaded, PROMPTS[2]), Sampling(max_new_tokens=10))
    again = Request(list(prompt), Sampling(max_new_tokens=6))
    chunks = _prefill_chunks(monkeypatch)
    trace = _engine_run(engine, loaded, {0: [running], 2: [again]})
    assert chunks == [(1, len(running.prompt_ids))]  # only the new prompt was prefilled
    assert trace[2][1] == 1  # `again` took its first token in the step it arrived
    for request in (running, again):
        assert request.completion_ids == _reference(loaded, request.prompt_ids, request.sampling.max_new_tokens)


def test_newcomers_with_beginnings_of_different_lengths_are_prefilled_together(tiny_models, monkeypatch):
    """Two prompts arriving together, each continuing a different earlier conversation (cached to
    different lengths), are read in one prefill: each row's cached columns end where its rest begins."""
    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, "qwen2")
    system = "Below is an instruction that describes a task. Write a response. "
    earlier = [Request(_ids(loaded, system + q), Sampling(max_new_tokens=4)) for q in ("hello world", PROMPTS[1])]
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    _engine_run(engine, loaded, {0: earlier[:1], 6: earlier[1:]})
    tails = [_ids(loaded, " then the quick brown fox jumps over the lazy dog twice"),
             _ids(loaded, " red green blue and yellow are colours of a rainbow")]
    score = _ids(loaded, " the capital of France")  # read with the prompt: its log-likelihood checks every logit
    later = [Request(r.prompt_ids + r.completion_ids + tail, Sampling(max_new_tokens=6), score_ids=score)
             for r, tail in zip(earlier, tails)]
    cached = [_cached_length(r) for r in earlier]
    assert cached[0] != cached[1] and min(len(t) for t in tails) > 8  # neither is a short rest
    chunks = _prefill_chunks(monkeypatch)
    _engine_run(engine, loaded, {0: later})
    assert chunks == [(2, max(len(r.prompt_ids) - c for r, c in zip(later, cached)) + len(score))]
    for request in later:
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 6)
        logprob, _ = _log_likelihood(loaded, request.prompt_ids, score, [True] * len(score))
        assert request.score_logprob == pytest.approx(logprob, rel=1e-5, abs=1e-4)


def _log_likelihood(loaded, prompt_ids, score_ids, counted):
    """Plain transformers: one unpadded forward of prompt + score ids, log p of each counted score id."""
    ids = torch.tensor([prompt_ids + score_ids])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt_ids) - 1 + j, token])
               for j, (token, keep) in enumerate(zip(score_ids, counted)) if keep), sum(counted)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("prefill_tokens", [5, 4096])
def test_score_ids_are_read_in_the_prefill_and_leave_the_answer_as_it_was(tiny_models, family, prefill_tokens):
    """evaluate's test loss rides on generation's prefill: the log-likelihood of tokens after each
    prompt equals a plain forward pass's, whether the prompt's end and its score ids fall in one
    chunk or several, with or without a shared beginning; the answers are generate's greedy ones."""
    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, family)
    system = "Below is an instruction that describes a task. Write a response. "
    prompts = [PROMPTS[0], PROMPTS[2], system + "hello world", system + "the quick brown fox"]
    vocab = loaded.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    requests, expected = [], []
    for index, prompt in enumerate(prompts):
        ids = _ids(loaded, prompt)
        score = torch.randint(3, vocab, (2 + 3 * index,), generator=generator).tolist()  # 2, 5, 8, 11 tokens
        counted = [j % 3 != 1 for j in range(len(score))] if index % 2 else []  # [] = all count
        requests.append(Request(ids, Sampling(max_new_tokens=6), score_ids=score, score_counted=counted))
        expected.append(_log_likelihood(loaded, ids, score, counted or [True] * len(score)))
    requests.append(Request(_ids(loaded, PROMPTS[1]), Sampling(max_new_tokens=6)))  # a row with nothing to score
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id, prefill_tokens=prefill_tokens)
    _engine_run(engine, loaded, {0: [*requests[:2], requests[4]], 2: requests[2:4]})  # 2 and 3 share a beginning
    for request, (logprob, count) in zip(requests, expected):
        assert request.score_count == count
        assert request.score_logprob == pytest.approx(logprob, rel=1e-5, abs=1e-4)
    assert requests[-1].score_count == 0 and requests[-1].score_logprob == 0.0
    for request in requests:
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 6)


def _decode_passes(engine, loaded, requests, monkeypatch) -> int:
    """Run the requests together; how many decode forward passes (one column each) it took."""
    import functools

    passes = []
    forward = loaded.model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        passes.extend([1] if kwargs["input_ids"].shape[1] == 1 else [])
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", counting)
    _engine_run(engine, loaded, {0: requests})
    monkeypatch.setattr(loaded.model, "forward", forward)
    return len(passes)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_greedy_rows_take_the_score_ids_they_agree_with_instead_of_decoding_them(tiny_models, family, monkeypatch):
    """The reference answer read in the prefill is a draft: a greedy row takes the score ids its own
    argmax agrees with and decodes on from the first it does not. A row whose score ids are its greedy
    answer needs no decode pass; one that agrees on 3 tokens skips 3; the answers are generate's
    greedy ones either way, and a sampling row is not affected."""
    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, family)
    vocab, new = loaded.model.config.vocab_size, 8
    prompts = [_ids(loaded, p) for p in PROMPTS]
    greedy = [_reference(loaded, ids, new) for ids in prompts]
    assert all(len(answer) == new for answer in greedy)  # random tiny models: no early end of turn

    def engine():
        return Engine(loaded.model, loaded.tokenizer.pad_token_id, prefill_tokens=4096)

    whole = [Request(ids, Sampling(max_new_tokens=new), score_ids=answer + [loaded.tokenizer.eos_token_id])
             for ids, answer in zip(prompts, greedy)]
    assert _decode_passes(engine(), loaded, whole, monkeypatch) == 0
    assert [r.completion_ids for r in whole] == greedy
    assert all(r.finish_reason == "length" for r in whole)

    wrong = (greedy[0][3] + 1) % vocab
    three = Request(prompts[0], Sampling(max_new_tokens=new), score_ids=greedy[0][:3] + [wrong] + greedy[0][4:])
    assert _decode_passes(engine(), loaded, [three], monkeypatch) == new - 3 - 1  # 4 tokens from the prefill
    assert three.completion_ids == greedy[0]

    sampling = Sampling(max_new_tokens=new, temperature=1.0, seed=11)
    plain = Request(prompts[1], sampling)
    drafted = Request(prompts[1], sampling, score_ids=greedy[1])
    other = Request(prompts[2], Sampling(max_new_tokens=new), score_ids=[(greedy[2][0] + 1) % vocab] + greedy[2][1:])
    _run(loaded, [plain])
    assert _decode_passes(engine(), loaded, [drafted, other], monkeypatch) == new - 1
    assert drafted.completion_ids == plain.completion_ids  # sampled from the prompt's end, as without a draft
    assert other.completion_ids == greedy[2]


def test_a_step_records_nothing_for_autograd(tiny_models):
    """The server steps the engine from its own thread, outside any no_grad: the passes must still
    keep no graph (the model's weights require grad; the cache is written in place every step)."""
    from tunesmith.infer.engine import Engine, _layers

    loaded = _loaded(tiny_models, "qwen2")
    assert any(p.requires_grad for p in loaded.model.parameters())
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    requests = [Request(_ids(loaded, p), Sampling(max_new_tokens=4)) for p in PROMPTS]
    for request in requests:
        engine.admit(request, loaded.tokenizer, stop_token_ids(loaded))
    engine.step()
    engine.step()
    assert engine.running is not None
    for keys, values in _layers(engine.running.cache):
        assert not keys.requires_grad and keys.grad_fn is None and values.grad_fn is None


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_the_output_layer_gets_the_kept_columns_side_by_side(tiny_models, family):
    """A prefill of several prompts keeps each one's last column. Kept as transformers' slice, those
    rows are a view strided across the batch, which torch's CPU multiply takes 2-9x (fp32) to 550x
    (bf16) longer over: the engine asks for column indices, so the output layer gets them packed
    together, and the answers stay transformers' own."""
    loaded = _loaded(tiny_models, family)
    seen = []
    hook = loaded.model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    requests = [Request(_ids(loaded, p), Sampling(max_new_tokens=4)) for p in PROMPTS]
    _run(loaded, requests)
    hook.remove()
    assert any(rows > 1 for (rows, *_), _ in seen)  # the prompts' prefill, several rows at once
    assert all(contiguous for _, contiguous in seen)
    for request in requests:
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 4)


def test_models_loaded_to_generate_keep_their_linear_weights_column_major(tiny_models):
    """A decode step multiplies a few rows by each weight, which MKL does faster from a column-major
    weight: the loaders for generation store them so (same values, same logits); export's loader,
    whose model is saved, keeps the saved layout."""
    from tunesmith.infer.generate import load_base

    for family in ("qwen2", "gpt2"):
        loaded = _loaded(tiny_models, family)
        saved = load_base(str(tiny_models(family)), device="cpu", precision="fp32", for_saving=True)
        linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
        assert all(p.is_contiguous() for p in saved.model.parameters())
        ids = torch.tensor([_ids(loaded, p)[:5] for p in PROMPTS])
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, saved.model(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_padded_prefill_attends_grouped_heads_without_repeating_their_keys(tiny_models, family, monkeypatch):
    """Prompts of different lengths prefill together behind a padding mask: the CPU's SDPA kernel
    reads each key/value head for its group of query heads (no repeat_kv copy), with the same
    logits as transformers' own SDPA path, and the same greedy answers as generate."""
    import transformers.integrations.sdpa_attention as sdpa

    from tunesmith.infer.attention import grouped_query_attention

    loaded = _loaded(tiny_models, family)
    config = loaded.model.config
    assert config.num_key_value_heads < config.num_attention_heads and config._attn_implementation == "sdpa"
    repeated = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *args: repeated.append(args[0].shape) or repeat_kv(*args))
    requests = _run(loaded, [Request(_ids(loaded, p), Sampling(max_new_tokens=6)) for p in PROMPTS])
    assert repeated == []
    for request in requests:
        assert request.completion_ids == _reference(loaded, request.prompt_ids, 6)
    ids = [_ids(loaded, p) for p in PROMPTS]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = loaded.model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        assert len(repeated) == 2 * config.num_hidden_layers  # transformers' path copies them: the probe sees it
        with grouped_query_attention(loaded.model):
            logits = loaded.model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        assert len(repeated) == 2 * config.num_hidden_layers
    assert config._attn_implementation == "sdpa"  # switched back after the pass
    real = mask.bool()
    assert torch.allclose(logits[real], expected[real], atol=1e-5, rtol=0)


def test_finished_rows_stay_in_the_batch_until_a_quarter_of_it_has_finished(tiny_models):
    """Dropping a row copies every other row's cache: one of eight finishing early is fed (and
    ignored) a few more steps; once a quarter of the rows have finished they are dropped together.
    No answer changes, and the engine counts only the rows still answering."""
    from tunesmith.infer.engine import Engine, _layers

    loaded = _loaded(tiny_models, "qwen2")
    ids = _ids(loaded, PROMPTS[1])
    limits = [3, 5, 12, 12, 12, 12, 12, 12]
    requests = [Request(list(ids), Sampling(max_new_tokens=n)) for n in limits]
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    for request in requests:
        engine.admit(request, loaded.tokenizer, stop_token_ids(loaded))
    seen = []  # (requests still answering, rows in the cache) after each step
    while engine.busy:
        engine.step()
        if engine.running is not None:
            seen.append((engine.size, _layers(engine.running.cache)[0][0].shape[0]))
    assert (7, 8) in seen  # the first to finish stayed in the cache
    assert (6, 6) in seen and (6, 8) not in seen  # with the second (a quarter), both left at once
    expected = _reference(loaded, ids, 12)
    for request, limit in zip(requests, limits):
        assert request.completion_ids == expected[:limit] and request.finish_reason == "length"


PACKED_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt_neox", "gpt2", "mixtral"]


def _counted_passes(loaded, monkeypatch) -> list[bool]:
    """Wraps the model's forward: one entry per pass, True where it was a packed pass."""
    import functools

    passes: list[bool] = []
    forward = loaded.model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        passes.append("tunesmith_packed" in kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", counting)
    return passes


@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_prompts_arriving_mid_decode_are_read_in_the_running_rows_pass(tiny_models, family, monkeypatch):
    """A newcomer's prompt, chunk by chunk, goes through the model in the same pass as the running
    rows' next tokens: once a row is running, one forward pass per step. Every answer is still
    generate's greedy one: the running row, two newcomers of different lengths arriving together,
    a long prompt read in several chunks."""
    from tunesmith.infer.engine import Engine
    from tunesmith.infer.packed import PACKABLE

    loaded = _loaded(tiny_models, family)
    assert family in PACKABLE or loaded.model.config.model_type in PACKABLE
    first = Request(_ids(loaded, PROMPTS[0]), Sampling(max_new_tokens=16))
    pair = [Request(_ids(loaded, PROMPTS[1]), Sampling(max_new_tokens=5)),
            Request(_ids(loaded, PROMPTS[2]), Sampling(max_new_tokens=7))]
    chunked = Request(_ids(loaded, " ".join(PROMPTS * 2)), Sampling(max_new_tokens=6))
    passes = _counted_passes(loaded, monkeypatch)
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id, prefill_tokens=8)
    assert engine.packs
    schedule, per_step = {0: [first], 2: pair, 6: [chunked]}, []  # (passes, packed passes) of each step
    while engine.busy or not per_step:
        for request in schedule.get(len(per_step), []):
            engine.admit(request, loaded.tokenizer, stop_token_ids(loaded))
        before = len(passes)
        engine.step()
        per_step.append((len(passes) - before, sum(passes[before:])))
    monkeypatch.undo()
    assert per_step[0] == (2, 0)  # the first prompt alone, then its first token's decode pass
    # from then on, while the first request answers: one pass a step, the newcomers' chunks inside it
    answering = per_step[1:len(first.completion_ids) - 1]
    assert all(count == 1 for count, _ in answering)
    assert sum(packed for _, packed in answering) >= math.ceil(len(chunked.prompt_ids) / 8) + 2
    for request in (first, *pair, chunked):
        assert request.completion_ids == _reference(loaded, request.prompt_ids, request.sampling.max_new_tokens)


def test_a_packed_pass_that_fails_is_undone_and_only_the_row_at_fault_fails(tiny_models, monkeypatch):
    """The model raises whenever one token is in its input: a newcomer whose prompt holds it arrives,
    with a good one, while another request decodes. The packed pass is undone, the passes of their
    own that follow find the row at fault: it fails alone, the two others get their greedy answers."""
    import functools

    from tunesmith.infer.engine import Engine

    loaded = _loaded(tiny_models, "qwen2")
    running = Request(_ids(loaded, PROMPTS[0]), Sampling(max_new_tokens=12))
    good = Request(_ids(loaded, PROMPTS[1]), Sampling(max_new_tokens=6))
    answers = {id(r): _reference(loaded, r.prompt_ids, r.sampling.max_new_tokens) for r in (running, good)}
    clean = set(running.prompt_ids + good.prompt_ids + answers[id(running)] + answers[id(good)])
    poison_ids = _ids(loaded, PROMPTS[2])
    poison_token = next(t for t in poison_ids if t not in clean)
    bad = Request(poison_ids, Sampling(max_new_tokens=6))
    forward, packed = loaded.model.forward, []

    @functools.wraps(forward)
    def poisoned(*args, **kwargs):
        packed.append("tunesmith_packed" in kwargs)
        if bool((kwargs["input_ids"] == poison_token).any()):
            raise RuntimeError("poisoned prompt")
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", poisoned)
    engine = Engine(loaded.model, loaded.tokenizer.pad_token_id)
    _engine_run(engine, loaded, {0: [running], 2: [good, bad]})
    monkeypatch.undo()
    assert True in packed  # the newcomers were first sent through the running row's pass
    assert bad.finish_reason == "error" and "poisoned prompt" in str(bad.error)
    for request in (running, good):
        assert request.error is None and request.completion_ids == answers[id(request)]
