"""Every model family goes through prepare → finetune → generate via the CLI; a model without
a chat template falls back to a plain template and says so."""

from __future__ import annotations

import json
import math

import pytest
from helpers import fast_train_flags, qa_rows, write_jsonl

from tunesmith.data.templates import ALPACA_HEAD
from tunesmith.infer.generate import generate, load_run, template_prompt

PROMPT = "What is 3 plus one?"


def expected_answer(run_dir, max_new_tokens: int = 6) -> str:
    loaded = load_run(run_dir, device="cpu", precision="fp32")
    [answer] = generate(loaded, [template_prompt(loaded, PROMPT)], max_new_tokens, 1)
    return answer


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "qwen2", "gemma"])
def test_prepare_finetune_generate(cli, tiny_models, tmp_path, family):
    model = tiny_models(family)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    run_dir = tmp_path / "run"

    result = cli("prepare", "--model", model, "--data.path", data, "--out_dir", run_dir)
    assert result.code == 0, result.err
    assert f"Prepared {run_dir / 'data'}  (template: chat)" in result.out
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert [manifest["counts"][s]["examples"] for s in ("train", "val", "test")] == [10, 1, 1]

    result = cli("finetune", "--model", model, "--data.path", data, "--out_dir", run_dir,
                 *fast_train_flags(max_steps=2), "--train.learning_rate", 1e-2, "--lora.r", 4)
    assert result.code == 0, result.err
    assert "Reusing prepared data" in result.err  # prepare's output is used as is
    state = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    assert state["step"] == 2 and math.isfinite(state["train_loss"])
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "\"loss\"" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    result = cli("generate", "--adapter", run_dir, "--prompt", PROMPT, "--max-new-tokens", 6)
    assert result.code == 0, result.err
    assert result.out == expected_answer(run_dir) + "\n"  # the answer alone, nothing else on stdout


def test_model_without_chat_template_falls_back_and_says_so(cli, tiny_models, tmp_path):
    model = tiny_models("llama", chat=False)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    run_dir = tmp_path / "run"

    result = cli("prepare", "--model", model, "--data.path", data, "--out_dir", run_dir)
    assert result.code == 0, result.err
    assert f"{model} has no chat template: data.template auto uses the alpaca template" in result.err
    assert "template: alpaca" in result.err and "(template: alpaca)" in result.out
    row = json.loads((run_dir / "data" / "test" / "rows.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith(ALPACA_HEAD) and row["prompt"].endswith("### Response:\n")

    result = cli("finetune", "--model", model, "--data.path", data, "--out_dir", run_dir,
                 *fast_train_flags(max_steps=2))
    assert result.code == 0, result.err
    assert "Reusing prepared data" in result.err
    result = cli("generate", "--adapter", run_dir, "--prompt", PROMPT, "--max-new-tokens", 6)
    assert result.code == 0, result.err
    loaded = load_run(run_dir, device="cpu", precision="fp32")
    assert loaded.template.name == "alpaca"  # the run generates with the template it trained with
    assert template_prompt(loaded, PROMPT).startswith(ALPACA_HEAD)
    assert result.out == expected_answer(run_dir) + "\n"


def test_plain_model_with_chat_template_requested(cli, tiny_models, tmp_path):
    model = tiny_models("llama", chat=False)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    run_dir = tmp_path / "run"
    result = cli("prepare", "--model", model, "--data.path", data, "--out_dir", run_dir,
                 "--data.template", "chat")
    assert result.code == 0, result.err
    row = json.loads((run_dir / "data" / "test" / "rows.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == f"### User:\n{row['messages'][0]['content']}\n\n### Assistant:\n"


def test_generate_with_a_base_model(cli, llama):
    from tunesmith.infer.generate import load_base

    result = cli("generate", "--model", llama, "--prompt", PROMPT, "--max-new-tokens", 5)
    assert result.code == 0, result.err
    loaded = load_base(str(llama), device="cpu", precision="fp32")
    [answer] = generate(loaded, [template_prompt(loaded, PROMPT)], 5, 1)
    assert result.out == answer + "\n"
    prompt = template_prompt(loaded, PROMPT)
    assert prompt == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_generate_needs_a_model_or_a_run(cli):
    result = cli("generate", "--prompt", PROMPT)
    assert result.code == 2
    assert "give --model, --adapter RUN, or both" in result.err
