"""Checkpoints: folders that explain themselves and load with plain PEFT / transformers, pruning
of step-* folders, and early stopping that keeps best/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fast_train_flags, qa_rows, write_jsonl

from tunesmith.infer.generate import load_run
from tunesmith.train import checkpoint

PROBE = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61]])  # (1, 8) any token ids


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def assert_self_explaining(folder: Path, step: int, kind: str) -> dict:
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "trainer_state.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == step and state["kind"] == kind
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["data"]["template"] == "chat"  # 'auto' is pinned to what training used
    return state


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama):
    """A LoRA run of 4 steps that saves every step, validates every 2 and keeps 2 step folders."""
    from tunesmith.cli import main

    folder = tmp_path_factory.mktemp("lora-run")
    path = write_jsonl(folder / "d.jsonl", qa_rows(16))
    run_dir = folder / "run"
    code = main([str(a) for a in ["finetune", "--model", llama, "--data.path", path, "--out_dir", run_dir,
                                  *fast_train_flags(max_steps=4), "--train.learning_rate", 2e-2,
                                  "--train.save_interval", 1, "--train.save_total_limit", 2,
                                  "--train.eval_interval", 2, "--lora.r", 4, "--lora.dropout", 0]])
    assert code == 0
    return run_dir


def test_lora_run_layout(lora_run):
    assert sorted(p.name for p in lora_run.glob("step-*")) == ["step-000002", "step-000003"]  # pruned to 2
    assert not list(lora_run.glob("*.tmp*"))
    assert (lora_run / "config.yaml").is_file() and (lora_run / "data" / "manifest.json").is_file()
    state = assert_self_explaining(lora_run / "final", 4, "final")
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    validations = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
    assert [step for _, step in validations] == [2, 4]
    best_loss, best_step = min(validations)
    assert state["best_step"] == best_step and state["best_val_loss"] == pytest.approx(best_loss)
    assert_self_explaining(lora_run / "best", state["best_step"], "best")
    assert_self_explaining(lora_run / "step-000003", 3, "step")
    for name in ("final", "best", "step-000002"):
        names = {p.name for p in (lora_run / name).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not (lora_run / name / "model.safetensors").exists()  # an adapter, not a copy of the base


def test_lora_final_loads_with_plain_peft(lora_run, llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    base_logits = logits_of(base)
    peft_model = PeftModel.from_pretrained(base, str(lora_run / "final")).eval()
    ours = load_run(lora_run / "final", device="cpu", precision="fp32")
    assert ours.label == "tuned (final)"
    torch.testing.assert_close(logits_of(peft_model), logits_of(ours.model), rtol=1e-5, atol=1e-5)
    assert (logits_of(peft_model) - base_logits).abs().max() > 1e-3  # the adapter changed something


def test_load_run_prefers_best(lora_run):
    assert checkpoint.pick(lora_run) == lora_run / "best"
    assert load_run(lora_run, device="cpu", precision="fp32").label == "tuned (best)"


def test_full_finetune_final_loads_with_plain_transformers(cli, llama, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", llama, "--method", "full", "--data.path", path, "--out_dir", run_dir,
                 "--data.val_split", 0, *fast_train_flags(max_steps=2), "--train.learning_rate", 1e-2)
    assert result.code == 0, result.err
    final = run_dir / "final"
    assert_self_explaining(final, 2, "final")
    assert {"config.json", "model.safetensors"} <= {p.name for p in final.iterdir()}
    assert not (run_dir / "best").exists()  # no validation split, so no best/
    plain = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ours = load_run(run_dir, device="cpu", precision="fp32")
    assert ours.label == "tuned (final)"
    torch.testing.assert_close(logits_of(plain), logits_of(ours.model), rtol=1e-6, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    assert (logits_of(plain) - logits_of(base)).abs().max() > 1e-3


def test_early_stopping_stops_and_keeps_best(cli, llama, tmp_path):
    """Validation asks for the opposite answers, so validation loss soon turns upwards."""
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"question": f"Is {i} red?", "answer": "yes"} for i in range(8)])
    val = write_jsonl(tmp_path / "val.jsonl",
                      [{"question": f"Is {i} red?", "answer": "no"} for i in range(4)])
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", llama, "--method", "full", "--out_dir", run_dir,
                 "--data.path", train, "--data.val_path", val, "--data.test_split", 0,
                 *fast_train_flags(max_steps=40), "--train.learning_rate", 1e-2,
                 "--train.eval_interval", 1, "--train.early_stopping_patience", 2)
    assert result.code == 0, result.err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    best_step = 1 + val_losses.index(min(val_losses))
    final = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    assert final["step"] < 40, val_losses  # stopped early...
    assert final["step"] == len(val_losses) == best_step + 2  # ...after 2 passes without improvement
    assert all(loss > min(val_losses) for loss in val_losses[-2:])
    assert final["best_step"] == best_step and final["best_val_loss"] == pytest.approx(min(val_losses))
    best = json.loads((run_dir / "best" / "trainer_state.json").read_text())
    assert best["step"] == best_step and best["val_loss"] == pytest.approx(min(val_losses))
    assert "Stopped early" in result.out
    assert f"Early stopping at step {final['step']}" in result.err


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        folder = tmp_path / f"step-{step:06d}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        (folder / checkpoint.MANIFEST).write_text(json.dumps({"files": {}}))
    (tmp_path / "best").mkdir()
    (tmp_path / "final").mkdir()
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final", "step-000015", "step-000020"]


def test_pick_without_checkpoints_is_a_clear_error(tmp_path):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="holds no finished checkpoint"):
        checkpoint.pick(tmp_path)


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder that verifies (its manifest lists its one file) or was cut off mid-save."""
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        digest = checkpoint._sha256(folder / "trainer_state.json")
        (folder / checkpoint.MANIFEST).write_text(json.dumps({"files": {"trainer_state.json": digest}}))
    return folder


@pytest.mark.parametrize("new_copy_complete", [False, True])
def test_a_crash_between_the_two_renames_never_loses_best(tmp_path, new_copy_complete):
    # _replace moved best/ to best.old and died before best.tmp became best/
    fake_checkpoint(tmp_path / "best.old", step=10)
    fake_checkpoint(tmp_path / "best.tmp", step=20, complete=new_copy_complete)
    fake_checkpoint(tmp_path / "final", step=30)
    checkpoint.prune(tmp_path, keep=2)  # what the next save in the run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]
    state = json.loads((tmp_path / "best" / "trainer_state.json").read_text())
    assert state["step"] == (20 if new_copy_complete else 10)  # the newest copy that verifies
    assert checkpoint.pick(tmp_path) == tmp_path / "best"


def test_replace_keeps_the_only_copy_until_the_new_one_is_in_place(tmp_path):
    fake_checkpoint(tmp_path / "final.old", step=10)  # left by a crash: the only complete copy
    tmp = fake_checkpoint(tmp_path / "final.tmp", step=20)
    checkpoint._replace(tmp, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert json.loads((tmp_path / "final" / "trainer_state.json").read_text())["step"] == 20
