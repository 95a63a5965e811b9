"""`tunesmith serve` as a client sees it: a real server process on a free loopback port, a tiny
base model with two LoRA runs trained here, and the real `openai` client. Every greedy answer is
checked against plain transformers + PEFT on the same prompt."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from helpers import REPO, fast_train_flags, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

KEY = "test-key-123"
MAX_PROMPT_TOKENS = 48
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def train_lora(model_dir, folder, rows, name):
    from tunesmith.cli import main

    data = write_jsonl(folder / f"{name}.jsonl", rows)
    code = main([str(a) for a in ["finetune", "--model", model_dir, "--data.path", data, "--out_dir", folder / name,
                                  "--train.learning_rate", "0.05", "--lora.dropout", "0", *fast_train_flags(2)]])
    assert code == 0
    return folder / name


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-runs")
    model_dir = tiny_models("qwen2")
    sums = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(8)]
    colors = [{"question": f"Name color {i}", "answer": ["red sky", "green fox", "blue dog"][i % 3]} for i in range(8)]
    return model_dir, train_lora(model_dir, folder, sums, "sums"), train_lora(model_dir, folder, colors, "colors")


def start_server(*args) -> tuple[subprocess.Popen, str]:
    """`python -m tunesmith serve ... --port 0`; returns the process and its base URL once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--port", "0", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "".join(seen)
            continue
        seen.append(line)
        if line.startswith("Serving "):
            return process, line.split(" on ")[1].split()[0]
    process.kill()
    raise AssertionError("the server did not start: " + "".join(seen))


@pytest.fixture(scope="module")
def server(runs):
    model_dir, sums, colors = runs
    process, url = start_server("--model", model_dir, "--adapter", f"sums={sums}", "--adapter", colors,
                                "--api-key", KEY, "--max-prompt-tokens", MAX_PROMPT_TOKENS, "--max-tokens", 64,
                                "--max-batch-size", 4, "--precision", "fp32")  # the references are fp32
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def chatml(messages: list[dict]) -> str:
    """tiny.CHAT_TEMPLATE's rendering of `messages`, written out by hand, the assistant's turn opened."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


class Reference:
    """Plain transformers (+ PEFT for an adapter), greedy, one prompt at a time; chat prompts are
    written out by hand."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.models = {}

    def model(self, adapter=None):
        if adapter not in self.models:
            model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter / "best"))
            self.models[adapter] = model.eval()
        return self.models[adapter]

    def answer(self, ids: list[int], max_new_tokens: int, adapter=None) -> tuple[str, int]:
        output = self.model(adapter).generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                              do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                                              pad_token_id=self.tokenizer.pad_token_id)
        new = [t for t in output[0, len(ids):].tolist() if t != self.tokenizer.eos_token_id]
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)

    def chat(self, messages, max_new_tokens, adapter=None):
        ids = self.tokenizer(chatml(messages), add_special_tokens=False)["input_ids"]
        return (*self.answer(ids, max_new_tokens, adapter), len(ids))

    def complete(self, prompt, max_new_tokens, adapter=None):
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return (*self.answer(ids, max_new_tokens, adapter), len(ids))


@pytest.fixture(scope="module")
def reference(runs):
    return Reference(runs[0])


def test_lists_the_base_and_both_adapters(client, runs):
    ids = [m.id for m in client.models.list()]
    assert ids == [runs[0].name, "sums", "colors"]
    assert client.models.retrieve("sums").owned_by == "tunesmith"


def test_chat_completion_per_adapter_matches_transformers_and_peft(client, runs, reference):
    model_dir, sums, colors = runs
    answers = {}
    for name, adapter in [(model_dir.name, None), ("sums", sums), ("colors", colors)]:
        response = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=10, temperature=0)
        text, generated, prompt_tokens = reference.chat(QUESTION, 10, adapter)
        assert response.model == name
        assert response.choices[0].message.role == "assistant"
        assert response.choices[0].message.content == text
        assert response.choices[0].finish_reason == ("length" if generated == 10 else "stop")
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, generated)
        assert response.usage.total_tokens == prompt_tokens + generated
        answers[name] = text
    assert len(set(answers.values())) == 3  # the request's model really picks the adapter


def test_completion_is_raw_text_without_template(client, runs, reference):
    response = client.completions.create(model="colors", prompt="the quick brown fox", max_tokens=12, temperature=0)
    text, generated, prompt_tokens = reference.complete("the quick brown fox", 12, runs[2])
    assert response.choices[0].text == text
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, generated)


def test_streaming_chat_and_completion_add_up_to_the_whole_answer(client, runs, reference):
    stream = client.chat.completions.create(model="colors", messages=QUESTION, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text, generated, prompt_tokens = reference.chat(QUESTION, 10, runs[2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # token by token, not at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("length" if generated == 10 else "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated
    assert chunks[-1].usage.prompt_tokens == prompt_tokens

    pieces = [c.choices[0].text for c in client.completions.create(
        model="sums", prompt="hello world", max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == reference.complete("hello world", 8, runs[1])[0]


def test_concurrent_clients_on_different_adapters_get_their_own_answers(client, runs, reference):
    """Twelve requests at once over three models: batched together where they share a model, each
    still gets exactly its sequential answer."""
    model_dir, sums, colors = runs
    prompts = ["hello", "the quick brown fox", "What is 3 plus one?", "red green blue"]
    models = [(model_dir.name, None), ("sums", sums), ("colors", colors)]
    jobs = [(name, adapter, prompt) for prompt in prompts for name, adapter in models]

    def ask(job):
        name, _, prompt = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [reference.complete(prompt, 6, adapter)[0] for _, adapter, prompt in jobs]


def test_wrong_or_missing_key_is_401(server):
    for key in ("wrong-key", ""):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=server, api_key=key or "-", max_retries=0).models.list()
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"


def test_too_long_prompt_is_400(client, runs):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sums", messages=[{"role": "user", "content": "hello world " * 40}])
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert f"at most {MAX_PROMPT_TOKENS}" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="sums", prompt="hello", max_tokens=65)
    assert caught.value.param == "max_tokens"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "sums" in caught.value.message  # the error lists what there is


def test_bad_requests_are_400_with_an_openai_error_body(client):
    cases = [{"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
             {"messages": QUESTION, "temperature": 5}, {"messages": QUESTION, "frequency_penalty": 0.5},
             {"messages": [{"role": "assistant", "content": "hi"}]}]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="sums", **case)
        assert caught.value.body["type"] == "invalid_request_error", case
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body={"model": "sums"}, cast_to=object)
    assert caught.value.body["message"] == "messages: Field required"


def test_health_is_open_and_says_ok(server):
    import json
    import urllib.request

    with urllib.request.urlopen(server.removesuffix("/v1") + "/health", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}


def test_full_queue_is_429_and_queued_requests_run_once_decoding_starts(runs):
    """In-process: a decoder that has not started yet, a queue of one; the second request is
    refused with 429 and the first one is answered once decoding starts."""
    import uvicorn

    from tunesmith.infer.registry import load_models
    from tunesmith.infer.scheduler import Scheduler
    from tunesmith.infer.serve import Limits, ServerState, build_app

    models = load_models(str(runs[0]), [], device="cpu", precision="fp32")
    scheduler = Scheduler(max_batch_size=1, max_queue=1)
    state = ServerState(models, scheduler, Limits(64, 16, 8), None, 0)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.completions.create, model=runs[0].name, prompt="hello", max_tokens=4)
            deadline = time.monotonic() + 30
            while scheduler.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as caught:
                client.completions.create(model=runs[0].name, prompt="hello", max_tokens=4)
            assert caught.value.status_code == 429 and caught.value.code == "queue_full"
            scheduler.start()
            assert first.result(timeout=60).usage.completion_tokens >= 1
    finally:
        server.should_exit = True
        scheduler.stop()


def test_base_and_lora_adapters_share_one_batch(runs, reference):
    """Six queued requests over the base and two LoRA adapters are decoded as one batch (PEFT
    applies each row's own adapter), and each answer is still the one PEFT gives it alone."""
    from tunesmith.infer.engine import Request, Sampling
    from tunesmith.infer.registry import load_models
    from tunesmith.infer.scheduler import Job, Scheduler

    model_dir, sums, colors = runs
    models = load_models(str(model_dir), [("sums", sums), ("colors", colors)], device="cpu", precision="fp32")
    assert {s.batch_key for s in models.values()} == {models["sums"].batch_key}  # all plain LoRA: mixable
    finished = threading.Semaphore(0)
    jobs = [Job(models[name], Request(reference.tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                      Sampling(max_new_tokens=6)), lambda error: finished.release())
            for prompt in ("hello", "the quick brown fox") for name in (model_dir.name, "sums", "colors")]
    scheduler = Scheduler(max_batch_size=8, max_queue=8)
    scheduler.submit(jobs)
    scheduler.start()
    try:
        for _ in jobs:
            assert finished.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert (scheduler.batches, scheduler.largest_batch) == (1, 6)
    adapters = {model_dir.name: None, "sums": sums, "colors": colors}
    for job in jobs:
        prompt = reference.tokenizer.decode(job.request.prompt_ids)
        assert job.request.text == reference.complete(prompt, 6, adapters[job.served.name])[0]


def test_a_repeated_prompt_reuses_what_its_own_adapter_read_only(runs, reference):
    """The same prompt on the same adapter again is read from the prompt cache; on another adapter
    (other keys and values) it is read afresh. Every answer is the one PEFT gives it alone."""
    from tunesmith.infer.engine import Request, Sampling
    from tunesmith.infer.registry import load_models
    from tunesmith.infer.scheduler import Job, Scheduler

    model_dir, sums, colors = runs
    models = load_models(str(model_dir), [("sums", sums), ("colors", colors)], device="cpu", precision="fp32")
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    ids = reference.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scheduler = Scheduler(max_batch_size=8, max_queue=8).start()
    jobs = []
    try:
        for name in ("sums", "colors", "sums"):  # one after the other
            done = threading.Event()
            jobs.append(Job(models[name], Request(list(ids), Sampling(max_new_tokens=6)), lambda error, d=done: d.set()))
            scheduler.submit(jobs[-1:])
            assert done.wait(timeout=60)
    finally:
        scheduler.stop()
    assert scheduler.prompt_cache_use == (1, len(ids) - 1)
    for job, adapter in zip(jobs, (sums, colors, sums)):
        assert job.request.text == reference.complete(prompt, 6, adapter)[0]


def test_a_negative_prompt_cache_is_a_one_line_error(runs, cli):
    result = cli("serve", "--model", runs[0], "--prompt-cache-mb", "-1")
    assert result.code == 2 and result.err.strip().count("\n") == 0 and "--prompt-cache-mb -1" in result.err


def test_newcomers_on_other_adapters_ride_in_the_running_rows_pass(runs, reference):
    """Requests on the base and on two LoRA adapters arriving while others decode: once a row runs,
    one forward pass a step, each token through its own row's adapter (the newcomers' prompts read in
    8-token chunks inside it), and every answer is still the one PEFT gives it alone."""
    from tunesmith.infer.engine import Engine, Request, Sampling
    from tunesmith.infer.generate import stop_token_ids
    from tunesmith.infer.registry import load_models

    model_dir, sums, colors = runs
    models = load_models(str(model_dir), [("sums", sums), ("colors", colors)], device="cpu", precision="fp32")
    shared = models["sums"].loaded
    passes = []
    forward = shared.model.forward

    def counting(*args, **kwargs):
        passes.append("tunesmith_packed" in kwargs)
        return forward(*args, **kwargs)

    shared.model.forward = counting
    try:
        engine = Engine(shared.model, shared.tokenizer.pad_token_id, prefill_tokens=8, mixed_adapters=True)
        assert engine.packs and engine.routes  # plain LoRA adapters: each token routed to its row's

        def request(name, prompt, tokens):
            ids = reference.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return models[name], Request(ids, Sampling(max_new_tokens=tokens))

        schedule = {0: [request(model_dir.name, "hello", 14)],
                    2: [request("sums", "What is 3 plus one?", 5), request("colors", "Name color 2", 6)],
                    5: [request("colors", "red green blue and the quick brown fox jumps over the dog", 4)]}
        per_step, admitted = [], []
        while engine.busy or len(per_step) <= max(schedule):
            for served, job in schedule.get(len(per_step), []):
                engine.admit(job, served.loaded.tokenizer, stop_token_ids(served.loaded), served.peft_name)
                admitted.append((served, job))
            before = len(passes)
            engine.step()
            per_step.append((len(passes) - before, sum(passes[before:])))
    finally:
        del shared.model.forward
    first = admitted[0][1]
    answering = per_step[1:len(first.completion_ids) - 1]
    assert all(count == 1 for count, _ in answering), per_step  # never a second pass for the newcomers
    assert sum(packed for _, packed in answering) >= 4, per_step
    adapters = {model_dir.name: None, "sums": sums, "colors": colors}
    for served, job in admitted:
        prompt = reference.tokenizer.decode(job.prompt_ids)
        assert job.text == reference.complete(prompt, job.sampling.max_new_tokens, adapters[served.name])[0]


def test_dora_adapters_switch_per_batch(runs, reference, tmp_path):
    """PEFT cannot mix DoRA rows with others, so a DoRA run makes the shared base switch adapters
    per batch (set_adapter / adapters off for the base); the answers still match PEFT's."""
    from tunesmith.infer.engine import Request, Sampling
    from tunesmith.infer.registry import load_models
    from tunesmith.infer.scheduler import Job, Scheduler

    model_dir, sums, _ = runs
    rows = [{"question": f"Spell {i}", "answer": "one two three"} for i in range(8)]
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "dora.jsonl", rows)
    assert main([str(a) for a in ["finetune", "--model", model_dir, "--method", "dora", "--data.path", data,
                                  "--out_dir", tmp_path / "dora", "--train.learning_rate", "0.05",
                                  "--lora.dropout", "0", *fast_train_flags(2)]]) == 0
    models = load_models(str(model_dir), [("sums", sums), ("dora", tmp_path / "dora")], device="cpu", precision="fp32")
    assert len({s.batch_key for s in models.values()}) == 3
    finished = threading.Semaphore(0)
    names = [model_dir.name, "dora", "sums", "dora", model_dir.name]
    jobs = [Job(models[name], Request(reference.tokenizer("hello", add_special_tokens=False)["input_ids"],
                                      Sampling(max_new_tokens=6)), lambda error: finished.release())
            for name in names]
    scheduler = Scheduler(max_batch_size=8, max_queue=8)
    scheduler.submit(jobs)
    scheduler.start()
    try:
        for _ in jobs:
            assert finished.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert scheduler.batches == 3  # one per model, oldest first
    adapters = {model_dir.name: None, "sums": sums, "dora": tmp_path / "dora"}
    answers = [job.request.text for job in jobs]
    assert answers == [reference.complete("hello", 6, adapters[name])[0] for name in names]
    assert len(set(answers)) == 3


# ---- isolation: bad and poisoned requests among good ones ----------------------------------------

POISON_POSITION = 48  # the in-process server's model raises on a decode step that reaches this position


def poison_decode_steps(model, position: int) -> None:
    """Make `model` raise on any decode step (one new token per row) that reaches `position`, alone
    or with a prefill chunk in its pass: a stand-in for a request that crashes the pass its batch shares."""
    import functools

    forward = model.forward

    @functools.wraps(forward)
    def poisoned(*args, **kwargs):
        packed = kwargs.get("tunesmith_packed")  # the running rows' tokens are its first part
        decoding = kwargs["position_ids"] if packed is None else packed.parts[0].positions
        if (packed is not None or kwargs["input_ids"].shape[1] == 1) and int(decoding.max()) >= position:
            raise RuntimeError("poisoned decode step")
        return forward(*args, **kwargs)

    model.forward = poisoned


def serve_in_thread(state):
    """The app of `state` on a free loopback port in this process; returns the base URL and a stopper."""
    import uvicorn

    from tunesmith.infer.serve import build_app

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()

    def stop():
        server.should_exit = True
        state.scheduler.stop()

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop


@pytest.fixture(scope="module")
def poisoned(tiny_models):
    """A base model whose decode steps fail at POISON_POSITION, its name, and fp32 references."""
    from tunesmith.infer.registry import load_models

    model_dir = tiny_models("qwen2")
    models = load_models(str(model_dir), [], device="cpu", precision="fp32")
    poison_decode_steps(models[model_dir.name].loaded.model, POISON_POSITION)
    return models, model_dir.name, Reference(model_dir)


def poisoned_server(poisoned, start: bool = True, max_batch_size: int = 16):
    from tunesmith.infer.scheduler import Scheduler
    from tunesmith.infer.serve import Limits, ServerState

    scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=128, prefill_tokens=64)
    state = ServerState(poisoned[0], scheduler, Limits(64, 32, 8, max_body_bytes=20_000), None, 0)
    if start:
        scheduler.start()
    url, stop = serve_in_thread(state)
    return url, scheduler, stop


GOOD_PROMPTS = ["hello", "the quick brown fox", "What is 3 plus one?", "red green blue"]
POISON_PROMPT = "the quick brown fox jumps over the lazy dog " * 2  # 41 tokens


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    import http.client
    import json
    from urllib.parse import urlparse

    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        connection.request("POST", f"{where.path}{path}", body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_a_poisoned_request_fails_alone_inside_a_batch_of_good_ones(poisoned):
    """Six good requests, one whose decode step raises and one with an impossible seed: the seed is
    refused at the edge (400), the poisoned one fails alone (500) although it shares the batch, and
    every good one gets exactly its greedy answer."""
    _, name, reference = poisoned
    assert len(reference.tokenizer(POISON_PROMPT)["input_ids"]) < POISON_POSITION
    url, scheduler, stop = poisoned_server(poisoned, start=False)
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=60)
    good = [p for p in GOOD_PROMPTS for _ in range(2)][:6]
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(client.completions.create, model=name, prompt=p, max_tokens=12, temperature=0)
                       for p in good[:3]]
            bad = pool.submit(client.completions.create, model=name, prompt=POISON_PROMPT, max_tokens=12, temperature=0)
            answers += [pool.submit(client.completions.create, model=name, prompt=p, max_tokens=12, temperature=0)
                        for p in good[3:]]
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model=name, prompt="hello", max_tokens=4, seed=2**70)
            deadline = time.monotonic() + 30
            while scheduler.waiting < 7 and time.monotonic() < deadline:
                time.sleep(0.02)
            scheduler.start()  # all seven were queued: they are decoded as one batch
            texts = [a.result(timeout=60).choices[0].text for a in answers]
            with pytest.raises(openai.InternalServerError) as failed:
                bad.result(timeout=60)
    finally:
        stop()
    assert refused.value.param == "seed" and "2**63-1" in refused.value.message
    assert "poisoned decode step" in failed.value.message
    assert scheduler.largest_batch == 7
    assert texts == [reference.complete(p, 12)[0] for p in good]


def test_64_concurrent_clients_good_and_bad_requests_all_good_ones_succeed(poisoned):
    """64 clients at once; half send good requests (chat, completion, streamed), half bad ones
    (seed out of range, n=0, too many stop strings, a too-large body, temperature 9, a poisoned
    decode step). Each bad one gets its own 4xx/500; no good one fails."""
    import json

    _, name, reference = poisoned
    url, scheduler, stop = poisoned_server(poisoned, max_batch_size=16)
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=120)
    bad_bodies = [({"seed": 2**70}, 400), ({"n": 0}, 400), ({"stop": ["a", "b", "c", "d", "e"]}, 400),
                  ({"prompt": "x" * 30_000}, 413), ({"temperature": 9}, 400), ({"prompt": POISON_PROMPT, "max_tokens": 12}, 500)]

    def good(index: int):
        prompt = GOOD_PROMPTS[index % len(GOOD_PROMPTS)]
        if index % 3 == 0:
            answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=6, temperature=0).choices[0].message.content
            return answer == reference.chat([{"role": "user", "content": prompt}], 6)[0]
        if index % 3 == 1:
            answer = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        else:
            answer = "".join(c.choices[0].text for c in client.completions.create(
                model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True))
        return answer == reference.complete(prompt, 6)[0]

    def bad(index: int):
        fields, status = bad_bodies[index % len(bad_bodies)]
        body = {"model": name, "prompt": "hello", "max_tokens": 6, "temperature": 0, **fields}
        got, answer = post(url, "/completions", json.dumps(body).encode())
        return got == status and "message" in answer["error"]

    try:
        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(lambda i: (i % 2 == 0, good(i // 2) if i % 2 == 0 else bad(i // 2)), range(64)))
    finally:
        stop()
    assert [ok for is_good, ok in outcomes if is_good] == [True] * 32
    assert [ok for is_good, ok in outcomes if not is_good] == [True] * 32
    assert scheduler.largest_batch > 1


def test_a_body_over_the_cap_is_refused_before_it_is_read(poisoned):
    """413 by the declared length, and for a chunked upload (no length) as soon as the cap is passed."""
    import http.client
    from urllib.parse import urlparse

    url, _, stop = poisoned_server(poisoned)
    where = urlparse(url)
    try:
        status, answer = post(url, "/chat/completions", b"{" + b" " * 50_000 + b"}")
        assert status == 413 and "20000 bytes" in answer["error"]["message"]
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        connection.request("POST", f"{where.path}/completions", (b" " * 4096 for _ in range(20)),
                           {"Content-Type": "application/json"}, encode_chunked=True)
        assert connection.getresponse().status == 413
        connection.close()
    finally:
        stop()


# ---- --engine vllm ----------------------------------------------------------------------------

def test_vllm_engine_command_serves_the_same_names_template_and_key(runs):
    """The vLLM command line: the base under the built-in server's name, each run as a LoRA module
    under its served name, the runs' chat template, the API key in the environment, not argv."""
    from tunesmith.infer import serve, vllm_server
    from tunesmith.model.load import load_tokenizer

    model_dir, sums, colors = runs
    args = serve.parser().parse_args(["--engine", "vllm", "--model", str(model_dir), "--adapter", f"sums={sums}",
                                      "--adapter", str(colors), "--api-key", KEY, "--port", "9000",
                                      "--tensor-parallel-size", "2"])
    launch = vllm_server.plan(args, ["--gpu-memory-utilization", "0.8"])
    command = launch.command
    after = lambda flag: command[command.index(flag) + 1]
    assert command[:3] == ["vllm", "serve", str(model_dir)]
    assert after("--served-model-name") == model_dir.name
    lora_modules = command[command.index("--lora-modules") + 1: command.index("--lora-modules") + 3]
    assert lora_modules == [f"sums={sums / 'best'}", f"colors={colors / 'best'}"]
    assert "--enable-lora" in command and (after("--max-loras"), after("--max-lora-rank")) == ("2", "16")
    assert (after("--host"), after("--port"), after("--tensor-parallel-size")) == ("127.0.0.1", "9000", "2")
    assert after("--chat-template") == str(launch.template_path)
    assert launch.chat_template == load_tokenizer(sums / "best", quiet=True).chat_template
    assert KEY not in " ".join(command) and launch.env == {"VLLM_API_KEY": KEY}
    assert command[-2:] == ["--gpu-memory-utilization", "0.8"]


def test_vllm_engine_without_vllm_is_a_one_line_error(runs, cli):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    result = cli("serve", "--engine", "vllm", "--model", runs[0])
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "needs vLLM" in result.err
