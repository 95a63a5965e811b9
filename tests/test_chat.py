"""`tunesmith chat` driven as a user drives it: a real process, typed lines on stdin, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch
from helpers import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.infer.chat import Conversation
from tunesmith.infer.generate import load_base

# fp32 like the references: on a CPU with bf16 maths, precision auto would pick bf16, whose rounding
# can flip a tiny random model's greedy choice
GREEDY = ["--temperature", "0", "--top-k", "0", "--top-p", "1", "--repetition-penalty", "1", "--precision", "fp32"]


def chatml(messages: list[dict]) -> str:
    """tiny.CHAT_TEMPLATE's rendering of `messages`, written out by hand, the assistant's turn opened."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def reference_answer(model_dir, messages: list[dict], max_new_tokens: int) -> str:
    """Plain transformers, greedy in fp32, on the whole history written out by hand."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tokenizer(chatml(messages))["input_ids"]
    output = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


def chat_process(model_dir, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "chat", "--model", str(model_dir), *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ))


def test_multi_turn_history_reset_and_exit(tiny_models):
    model_dir = tiny_models("qwen2")
    first, second = "What is the capital of France?", "hello world"
    script = f"{first}\n{second}\n/reset\n{second}\n/nonsense\n/exit\nnever answered\n"
    process = chat_process(model_dir, *GREEDY, "--max-new-tokens", "8")
    out, err = process.communicate(script, timeout=120)
    assert process.returncode == 0, err

    answer_1 = reference_answer(model_dir, [{"role": "user", "content": first}], 8)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer_1},
               {"role": "user", "content": second}]
    answer_2 = reference_answer(model_dir, history, 8)
    fresh = reference_answer(model_dir, [{"role": "user", "content": second}], 8)
    assert answer_2 != fresh  # so the check below can tell whether the history reached the model
    assert answer_1.strip() and fresh.strip()  # visible text, not only newlines or an immediate end
    # every answer is the reference one; after /reset the history is gone; nothing after /exit runs
    assert out == f"you> {answer_1}\nyou> {answer_2}\nyou> you> {fresh}\nyou> you> "
    assert "(conversation cleared)" in err
    assert "unknown command /nonsense" in err


def test_ctrl_c_stops_the_answer_not_the_program(tiny_models):
    # the tiny mistral's greedy answer never ends by itself within 4000 tokens (the tiny qwen2's did,
    # after ~5 s: on a busy machine that raced the Ctrl-C)
    model_dir = tiny_models("mistral")
    process = chat_process(model_dir, *GREEDY, "--max-new-tokens", "4000")
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()
    process.stdin.write("tell me a long story\n")
    process.stdin.flush()
    deadline = time.monotonic() + 90
    while len("".join(seen)) < len("you> ") + 20 and time.monotonic() < deadline:  # the answer is streaming
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.stdin.write("/exit\n")
    process.stdin.flush()
    process.stdin.close()
    assert process.wait(timeout=60) == 0, process.stderr.read()
    reader.join(timeout=10)
    out = "".join(seen)
    assert " [stopped]\nyou> " in out  # the answer ended early and the prompt came back
    assert out.count("you> ") == 2


def test_long_conversations_drop_the_oldest_turns(tiny_models):
    loaded = load_base(str(tiny_models("qwen2")), device="cpu", precision="fp32")
    conversation = Conversation(loaded, "be brief", max_new_tokens=0)
    conversation.budget = 60  # tokens for the prompt: a few short turns
    for turn in range(6):
        ids = conversation.prompt_ids(f"question number {turn} about the quick brown fox")
        assert ids is not None and len(ids) <= 60
        conversation.answered(f"answer {turn}")
    assert conversation.messages[0] == {"role": "system", "content": "be brief"}  # the system message stays
    assert conversation.messages[-1]["content"] == "answer 5"
    assert "question number 0 about the quick brown fox" not in [m["content"] for m in conversation.messages]
    assert conversation.prompt_ids("a message far too long " * 40) is None  # refused, not kept
    assert conversation.messages[-1]["content"] == "answer 5"
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "be brief"}]


def test_each_turn_reads_only_the_new_message(tiny_models, monkeypatch):
    """The conversation keeps one engine: the second turn's prompt begins with the first turn's
    prompt and answer, found in the engine's prompt cache, so only the new message is read."""
    import io

    from tunesmith.infer import chat
    from tunesmith.infer.engine import Engine, Sampling

    engines: list[Engine] = []

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    model_dir = tiny_models("qwen2")
    loaded = load_base(str(model_dir), device="cpu", precision="fp32")
    lines = iter(["What is the capital of France?", "hello world", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    monkeypatch.setattr(chat, "Engine", Recorded)
    out = io.StringIO()
    assert chat.repl(loaded, Sampling(max_new_tokens=8), None, out) == 0
    assert len(engines) == 1
    first_turn = loaded.tokenizer(chatml([{"role": "user", "content": "What is the capital of France?"}]))["input_ids"]
    assert engines[0].prompts.hits == 1 and engines[0].prompts.tokens_reused >= len(first_turn)
