"""merge: merged logits equal base + adapter, plain transformers loads the result, non-finite weights
are refused. export: a GGUF that transformers' GGUF loader reads back with the same logits, and
refusals before anything is written."""

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


@pytest.mark.parametrize("kind, tolerance", [("f16", 1e-2), ("q8_0", 6e-2)])
def test_export_gguf_round_trips_through_transformers(runs, llama, cli, kind, tolerance):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs["lora"] / f"tuned.{kind}.gguf"
    result = cli("export", runs["lora"], "--format", "gguf", "--type", kind, "--out", out)
    assert result.code == 0, result.err
    assert f"Wrote {out}" in result.out and "relative RMS" in result.out
    reader = gguf.GGUFReader(str(out))
    template = reader.fields["tokenizer.chat_template"]
    assert "<|im_start|>" in bytes(template.parts[template.data[0]]).decode()
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
    # an independent reload: logits of the file against the merged model's
    reloaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    original = AutoTokenizer.from_pretrained(str(runs["lora"] / "final"))
    assert tokenizer("What is 7 plus one?")["input_ids"] == original("What is 7 plus one?")["input_ids"]
    _, tuned_logits = reference_logits(runs["lora"], llama)
    with torch.no_grad():
        logits = reloaded(IDS).logits
    centred = tuned_logits - tuned_logits.mean(-1, keepdim=True)
    assert float((logits - tuned_logits).norm() / centred.norm()) < tolerance


def test_export_sizes_and_self_check_catches_a_wrong_file(runs, cli, tmp_path, monkeypatch):
    from tunesmith import export

    f16 = cli("export", runs["lora"], "--type", "f16", "--out", tmp_path / "a.gguf")
    q8 = cli("export", runs["lora"], "--type", "q8_0", "--out", tmp_path / "b.gguf")
    assert f16.code == q8.code == 0
    assert (tmp_path / "b.gguf").stat().st_size < 0.7 * (tmp_path / "a.gguf").stat().st_size
    # a writer bug (q/k rows left in HF's order) must be caught by the reload check, leaving no file
    monkeypatch.setattr(export, "rotate_pairs", lambda weight, heads: weight)
    result = cli("export", runs["lora"], "--type", "f32", "--out", tmp_path / "c.gguf")
    assert result.code == 2 and "logits differ" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def test_export_refuses_an_unsupported_architecture_before_writing(tiny_models, cli, tmp_path):
    neox = tiny_models("gpt_neox")
    result = cli("export", neox, "--out", tmp_path / "x.gguf")
    assert result.code == 2
    assert "cannot export a gpt_neox model to GGUF" in result.err and "llama, qwen2" in result.err
    assert list(tmp_path.iterdir()) == []


def test_export_qwen2_with_its_own_pre_tokenizer(tiny_models, cli, tmp_path):
    import gguf

    out = tmp_path / "q.gguf"
    result = cli("export", tiny_models("qwen2"), "--type", "f16", "--out", out)
    assert result.code == 0, result.err
    from transformers import AutoTokenizer

    field = gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"]
    # Qwen2 splits digits one by one; with GPT-2's split "2021" would come back as other tokens
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    text = "Convert the date March 5, 2021 to ISO format."
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="q.gguf")
    assert reloaded(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_models("qwen2"))(text)["input_ids"]
