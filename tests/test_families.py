"""Every model family goes through prepare → finetune → generate via the CLI; a model without
a chat template falls back to a plain template and says so. Generated answers are checked against
plain transformers (+ PEFT for a run) on the prompt written out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import fast_train_flags, qa_rows, write_jsonl

PROMPT = "What is 3 plus one?"
CHAT_PROMPT = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"  # tiny.CHAT_TEMPLATE's rendering
# One answer for every question: a few steps of LoRA make a random model say visible words (its own
# greedy answer is newlines or an immediate end, which strip to "" whatever was applied).
PHRASE = "the quick brown fox jumps over the lazy dog"
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 f"the request.\n\n### Instruction:\n{PROMPT}\n\n### Response:\n")


def phrase_rows(count: int) -> list[dict]:
    return [{"question": f"What is {i} plus one?", "answer": PHRASE} for i in range(count)]


@pytest.fixture
def fp32_generation(monkeypatch):
    """Precision auto picks bf16 on a CPU where a bf16 matmul measures faster, whose rounding can
    flip a tiny random model's greedy choice. The references are fp32, so the CLI is run as on a
    CPU without bf16."""
    from tunesmith import device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)


def reference_answer(model_dir, prompt: str, max_new_tokens: int, adapter=None) -> str:
    """Plain transformers (+ PEFT for an adapter folder), fp32, greedy, end-of-sequence dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        output = model.eval().generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answer = [t for t in output[0, len(ids):].tolist() if t != tokenizer.eos_token_id]
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def next_logits(model_dir, prompt: str, adapter=None) -> torch.Tensor:
    """Plain transformers (+ PEFT): the logits after the prompt, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "qwen2", "gemma"])
def test_prepare_finetune_generate(cli, tiny_models, tmp_path, family, fp32_generation):
    model = tiny_models(family)
    data = write_jsonl(tmp_path / "d.jsonl", phrase_rows(12))
    run_dir = tmp_path / "run"

    result = cli("prepare", "--model", model, "--data.path", data, "--out_dir", run_dir)
    assert result.code == 0, result.err
    assert f"Prepared {run_dir / 'data'}  (template: chat)" in result.out
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert [manifest["counts"][s]["examples"] for s in ("train", "val", "test")] == [10, 1, 1]

    result = cli("finetune", "--model", model, "--data.path", data, "--out_dir", run_dir,
                 *fast_train_flags(max_steps=6), "--train.learning_rate", 2e-2, "--lora.r", 4)
    assert result.code == 0, result.err
    assert "Reusing prepared data" in result.err  # prepare's output is used as is
    state = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    assert state["step"] == 6 and math.isfinite(state["train_loss"])
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "\"loss\"" in line]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)

    result = cli("generate", "--adapter", run_dir, "--prompt", PROMPT, "--max-new-tokens", 6)
    assert result.code == 0, result.err
    # validation runs only at the last step, so best/ (which generate prefers) holds final/'s weights
    tuned = reference_answer(model, CHAT_PROMPT, 6, adapter=run_dir / "final")
    # the adapter really acts (6 steps on a tiny random model may leave base and tuned both answering
    # end-of-sequence first, so the text alone cannot show it)
    assert not torch.allclose(next_logits(model, CHAT_PROMPT, run_dir / "final"), next_logits(model, CHAT_PROMPT))
    assert result.out == tuned + "\n"  # the answer alone, nothing else on stdout


def test_model_without_chat_template_falls_back_and_says_so(cli, tiny_models, tmp_path, fp32_generation):
    model = tiny_models("llama", chat=False)
    data = write_jsonl(tmp_path / "d.jsonl", phrase_rows(8))
    run_dir = tmp_path / "run"

    result = cli("prepare", "--model", model, "--data.path", data, "--out_dir", run_dir)
    assert result.code == 0, result.err
    assert f"{model} has no chat template: data.template auto uses the alpaca template" in result.err
    assert "template: alpaca" in result.err and "(template: alpaca)" in result.out
    row = json.loads((run_dir / "data" / "test" / "rows.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == ALPACA_PROMPT.replace(PROMPT, row["messages"][0]["content"])

    result = cli("finetune", "--model", model, "--data.path", data, "--out_dir", run_dir,
                 *fast_train_flags(max_steps=6), "--train.learning_rate", 2e-2, "--lora.dropout", 0)
    assert result.code == 0, result.err  # no dropout: at this rate 6 steps of other masks can leave an empty answer
    assert "Reusing prepared data" in result.err
    result = cli("generate", "--adapter", run_dir, "--prompt", PROMPT, "--max-new-tokens", 6)
    assert result.code == 0, result.err
    tuned = reference_answer(model, ALPACA_PROMPT, 6, adapter=run_dir / "final")  # the template it trained with
    assert tuned and tuned != reference_answer(model, ALPACA_PROMPT, 6)
    assert result.out == tuned + "\n"


def test_plain_model_with_chat_template_requested(cli, tiny_models, tmp_path):
    model = tiny_models("llama", chat=False)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    run_dir = tmp_path / "run"
    result = cli("prepare", "--model", model, "--data.path", data, "--out_dir", run_dir,
                 "--data.template", "chat")
    assert result.code == 0, result.err
    row = json.loads((run_dir / "data" / "test" / "rows.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == f"### User:\n{row['messages'][0]['content']}\n\n### Assistant:\n"


def test_generate_with_a_base_model(cli, tiny_models):
    model = tiny_models("qwen2")  # whose greedy answer is visible text (the tiny llama's is newlines)
    result = cli("generate", "--model", model, "--prompt", PROMPT, "--max-new-tokens", 5,
                 "--device", "cpu", "--precision", "fp32")  # the reference's precision, whatever the CPU
    assert result.code == 0, result.err
    expected = reference_answer(model, CHAT_PROMPT, 5)
    assert expected and result.out == expected + "\n"


def test_generate_refuses_a_device_torch_cannot_use(cli, tiny_models, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("generate", "--model", tiny_models("qwen2"), "--prompt", PROMPT, "--device", "cuda")
    assert result.code == 2
    assert "device 'cuda'" in result.err and "CUDA GPUs that torch can use" in result.err
    assert "Traceback" not in result.err


def test_generate_needs_a_model_or_a_run(cli):
    result = cli("generate", "--prompt", PROMPT)
    assert result.code == 2
    assert "give --model, --adapter RUN, or both" in result.err
