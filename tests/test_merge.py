"""merge: merged logits equal base + adapter, plain transformers loads the result, non-finite weights
are refused. (GGUF export: tests/test_export.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import fast_train_flags, qa_rows, write_jsonl

IDS = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """A LoRA and a DoRA run (dropout 0, large rate so the adapters are far from zero) and a prompt
    adapter run on the tiny llama, trained once through the real CLI."""
    from tunesmith.cli import main

    root = tmp_path_factory.mktemp("merge-runs")
    data = write_jsonl(root / "d.jsonl", qa_rows(12))
    made = {}
    for method in ("lora", "dora", "adapter"):
        code = main(["finetune", "--model", str(tiny_models("llama")), "--method", method, "--data.path", str(data),
                     "--out_dir", str(root / method), "--lora.dropout", "0", "--train.learning_rate", "5e-2",
                     *map(str, fast_train_flags(max_steps=2))])
        assert code == 0
        made[method] = root / method
    return made


def reference_logits(run, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(IDS).logits
        tuned = PeftModel.from_pretrained(base, str(run / "final")).eval()
        return base_logits, tuned(IDS).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_equals_base_plus_adapter(runs, llama, cli, method):
    from transformers import AutoModelForCausalLM

    result = cli("merge", runs[method])
    assert result.code == 0, result.err
    merged_dir = runs[method] / "merged"
    assert "Merged model written to" in result.out and (merged_dir / "model.safetensors").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    assert json.loads((merged_dir / "merge_info.json").read_text())["method"] == method
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no PEFT
    base_logits, tuned_logits = reference_logits(runs[method], llama)
    with torch.no_grad():
        merged_logits = merged(IDS).logits
    torch.testing.assert_close(merged_logits, tuned_logits, rtol=1e-5, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter really changed the model


def test_merge_refuses_non_finite_weights_and_writes_nothing(runs, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(runs["lora"] / "final", broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    name = next(k for k in tensors if "lora_B" in k and "q_proj" in k)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    result = cli("merge", broken, "--out", tmp_path / "merged")
    assert result.code == 2
    assert "not finite" in result.err and "nothing was written" in result.err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


def test_merge_refuses_prompt_adapters(runs, cli):
    result = cli("merge", runs["adapter"], "--out", runs["adapter"] / "merged")
    assert result.code == 2 and "only lora, dora and qlora" in result.err
    assert not (runs["adapter"] / "merged").exists()


def test_generation_with_a_prompt_adapter_run_uses_the_adapter(runs, llama):
    from tunesmith.infer.generate import load_run

    loaded = load_run(runs["adapter"], device="cpu", precision="fp32")
    base_logits, tuned_logits = reference_logits(runs["adapter"], llama)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=IDS).logits, tuned_logits, rtol=1e-5, atol=1e-5)
    assert (tuned_logits - base_logits).abs().max() > 1e-4
