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
from transformers import AutoModelForCausalLM

from tunesmith.model.load import load_tokenizer

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
                                "--max-batch-size", 4)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


class Reference:
    """Plain transformers (+ PEFT for an adapter), greedy, one prompt at a time."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(model_dir, quiet=True)
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
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
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
