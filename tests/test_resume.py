"""Never lose a run: kill-and-resume gives the same weights, corrupted checkpoints are detected and
skipped, SIGINT saves and exits cleanly, non-finite steps are skipped then stop the run, a
crafted pickle is never executed, a full disk is refused before writing, and 2 data-parallel
CPU processes match one process."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, qa_rows, write_jsonl
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.train import checkpoint


def flags(model: Path, data: Path, out: Path, steps: int = 8, *extra) -> list[str]:
    return [str(a) for a in ["finetune", "--model", model, "--data.path", data, "--out_dir", out,
                             "--train.max_steps", steps, "--train.batch_size", 4, "--train.micro_batch_size", 2,
                             "--train.learning_rate", 2e-2, "--train.warmup_steps", 2, "--train.save_interval", 2,
                             "--train.save_total_limit", 10, "--train.eval_interval", 4, "--train.eval_iters", 2,
                             "--train.log_interval", 1, "--train.precision", "fp32", "--train.device", "cpu",
                             "--lora.r", 4, "--lora.dropout", 0.05, *extra]]  # dropout on: resume must restore the random state


def popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith", *args], cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "d.jsonl", qa_rows(40))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama, data) -> Path:
    """An uninterrupted run: the weights every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("resume-ref") / "run"
    assert main(flags(llama, data, out)) == 0
    return out


@pytest.mark.parametrize("kill_after", ["step-000002", "step-000006"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, llama, data, reference, kill_after):
    out = tmp_path / "run"
    process = popen(flags(llama, data, out))
    wait_for(out / kill_after / "manifest.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(flags(llama, data, out, 8, "--resume")) == 0
    ours, theirs = adapter(out / "final"), adapter(reference / "final")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key  # bitwise: CPU kernels here are deterministic
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # records of redone steps are not duplicated


def test_corrupted_newest_checkpoint_is_reported_and_skipped(tmp_path, llama, data, reference, capsys):
    out = tmp_path / "run"
    assert main(flags(llama, data, out, 6)) == 0  # leaves step-2 and step-4 (6 is the last step)
    weights = out / "step-000004" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    assert checkpoint.verify(out / "step-000004").startswith("corrupted")
    (out / "step-000005").mkdir()  # a save that died before its manifest
    folder, notes = checkpoint.latest_resumable(out)
    assert folder == out / "step-000002"
    assert any("step-000004 is corrupted" in n for n in notes) and any("step-000005 is incomplete" in n
                                                                        for n in notes)
    capsys.readouterr()
    assert main(flags(llama, data, out, 8, "--resume")) == 0
    assert "step-000004 is corrupted (adapter_model.safetensors does not match its checksum)" in \
        capsys.readouterr().err
    for key, value in adapter(out / "final").items():
        assert torch.equal(value, adapter(reference / "final")[key])


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path, llama, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    out = tmp_path / "run"
    assert main(flags(llama, data, out, 4)) == 0
    manifest = (out / "data" / "manifest.json").read_text()
    write_jsonl(data, qa_rows(40, start=100))  # other rows under the same name
    capsys.readouterr()
    assert main(flags(llama, data, out, 8, "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "the data files' content changed since it was trained" in err
    assert (out / "data" / "manifest.json").read_text() == manifest  # what it trained on is still there
    write_jsonl(data, qa_rows(40))  # the original rows back: the run goes on
    assert main(flags(llama, data, out, 8, "--resume")) == 0
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 8


def test_tokenizer_fingerprint_sees_the_merges_not_only_a_sample_of_the_vocabulary(tokenizer):
    from tokenizers import Tokenizer

    from tunesmith.data.prepare import tokenizer_fingerprint

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]  # same vocabulary, other splits of some words
    changed = copy.deepcopy(tokenizer)

    changed._tokenizer = Tokenizer.from_str(json.dumps(spec))
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tokenizer)


def test_sigint_saves_and_exits_cleanly(tmp_path, llama, data):
    out = tmp_path / "run"
    process = popen(flags(llama, data, out, 400, "--train.save_interval", 0))
    wait_for(out / "metrics.jsonl", process)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    saved = [p for p in checkpoint.step_folders(out) if checkpoint.verify(p) is None]
    assert len(saved) == 1 and (saved[0] / "optimizer.pt").is_file()
    assert f"SIGINT at step {int(saved[0].name[5:])}: saved {saved[0]}" in stderr
    assert "--resume" in stderr and "Traceback" not in stderr


def test_nan_steps_are_skipped_then_stop(tmp_path, llama, data, monkeypatch, capsys):
    from tunesmith.train import objective

    real_step = objective.train_step
    calls = {"n": 0}

    def poisoned(model, batches, *args, **kwargs):
        calls["n"] += 1
        loss = real_step(model, batches, *args, **kwargs)
        if calls["n"] in (3,) or calls["n"] >= 6:  # one isolated bad step, then a run of them
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(objective, "train_step", poisoned)
    out = tmp_path / "run"
    code = main(flags(llama, data, out, 20, "--train.max_bad_steps", 3))
    err = capsys.readouterr().err
    assert code == 2
    assert "step 3: loss or gradient is not finite; step skipped (1 in a row)" in err
    assert "not finite for 3 steps in a row (through step 8)" in err
    assert f"the last good checkpoint is {out / 'step-000006'}" in err
    assert checkpoint.verify(out / "step-000006") is None
    for value in adapter(out / "step-000006").values():
        assert torch.isfinite(value).all()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r.get("step") == 4 and "loss" in r] == [1]


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_not_executed(tmp_path, llama, data, capsys):
    out = tmp_path / "run"
    assert main(flags(llama, data, out, 4)) == 0
    folder = out / "step-000002"
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker), "param_groups": []}, folder / "optimizer.pt")
    manifest = json.loads((folder / "manifest.json").read_text())  # a forger would fix the checksum too
    manifest["files"]["optimizer.pt"] = checkpoint._sha256(folder / "optimizer.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    code = main(flags(llama, data, out, 4, "--resume", folder))
    assert code == 2 and not marker.exists()
    assert "cannot be loaded safely" in capsys.readouterr().err


def test_full_disk_is_refused_before_writing(tmp_path, llama, data, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    out = tmp_path / "run"
    assert main(flags(llama, data, out, 4)) == 2
    err = capsys.readouterr().err
    assert "not enough disk space to save" in err and "nothing was written" in err
    assert not list(out.glob("step-*")) and not list(out.glob("*.tmp"))


def ranks(args: list, timeout: float = 240) -> subprocess.CompletedProcess:
    """A `tunesmith finetune` that starts its own 2 CPU ranks (train.devices 2 relaunches via torchrun)."""
    process = subprocess.run([sys.executable, "-m", "tunesmith", *[str(a) for a in args]], cwd=REPO,
                             env=dict(os.environ), capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stderr[-3000:]
    return process


def test_two_cpu_ranks_match_one_process(tmp_path, llama, data):
    common = ["--train.eval_interval", 0, "--train.save_interval", 0, "--lora.dropout", 0]
    single, double = tmp_path / "one", tmp_path / "two"
    assert main(flags(llama, data, single, 4, *common, "--train.micro_batch_size", 4)) == 0
    process = ranks(flags(llama, data, double, 4, *common, "--train.devices", 2))
    assert "x 2 processes" in process.stderr
    ours, theirs = adapter(double / "final"), adapter(single / "final")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=2e-5)


def test_ddp_resume_restores_each_ranks_random_state(tmp_path, llama, data):
    """With dropout the ranks' random streams differ; each must get its own back on resume."""
    common = ["--train.devices", 2, "--train.eval_interval", 0, "--lora.dropout", 0.3]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    ranks(flags(llama, data, whole, 4, *common))
    rng = load_file(str(whole / "step-000002" / "rng.safetensors"))
    assert {"torch_cpu", "rank1/torch_cpu"} <= rng.keys()
    assert not torch.equal(rng["torch_cpu"], rng["rank1/torch_cpu"])  # the streams did diverge
    ranks(flags(llama, data, resumed, 4, *common, "--resume", whole / "step-000002"))
    ours, theirs = adapter(resumed / "final"), adapter(whole / "final")
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_dpo_on_two_ranks_matches_one_process(tmp_path, llama):
    """Preference steps go through the DDP root too (the policy's log-probs; the reference with the
    adapter switched off): 2 ranks end where one process does."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"What is {i} plus one?", "chosen": f"{i + 1}",
                                                   "rejected": f"I think it is {i + 2}, maybe"} for i in range(40)])
    common = ["--method", "dpo", "--train.eval_interval", 0, "--train.save_interval", 0, "--lora.dropout", 0]
    single, double = tmp_path / "one", tmp_path / "two"
    assert main(flags(llama, pairs, single, 4, *common, "--train.micro_batch_size", 4)) == 0
    ranks(flags(llama, pairs, double, 4, *common, "--train.devices", 2))
    ours, theirs = adapter(double / "final"), adapter(single / "final")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=2e-5)


def test_moe_lora_on_two_ranks_matches_one_process(tmp_path, tiny_models, data):
    """A mixture of experts (2 of 4 experts per token): LoRA on its fused expert weights turns dropout off
    with a note (PEFT refuses dropout there), and 2 DDP ranks end where one process does. (flags() asks
    for dropout 0.05.)"""
    mixtral = tiny_models("mixtral")
    common = ["--train.eval_interval", 0, "--train.save_interval", 0]
    single, double = tmp_path / "one", tmp_path / "two"
    process = ranks(flags(mixtral, data, single, 3, *common, "--train.micro_batch_size", 4))
    assert "lora.dropout 0.05 is off for this model" in process.stderr
    ranks(flags(mixtral, data, double, 3, *common, "--train.devices", 2), timeout=180)
    ours, theirs = adapter(double / "final"), adapter(single / "final")
    assert any("experts" in key for key in ours)
    for key in ours:  # Adam turns rounding differences of tiny router gradients into ~1e-5
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4)


def full_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_fsdp_full_finetune_matches_one_process_and_resumes(tmp_path, llama, data):
    """FSDP2 on 2 gloo ranks: each holds half of every weight, gradient and Adam moment, and ends
    with the weights one process gets from the same global batch; a resumed run ends the same."""
    common = ["--method", "full", "--train.learning_rate", 1e-3, "--train.eval_interval", 0]
    single, sharded, resumed = tmp_path / "one", tmp_path / "fsdp", tmp_path / "resumed"
    assert main(flags(llama, data, single, 4, *common, "--train.micro_batch_size", 4)) == 0
    process = ranks(flags(llama, data, sharded, 4, *common, "--train.devices", 2, "--train.strategy", "fsdp"))
    assert "x 2 processes (fsdp)" in process.stderr
    ours, theirs = full_weights(sharded / "final"), full_weights(single / "final")
    assert ours.keys() == theirs.keys()
    moved, at_step_2 = 0, full_weights(sharded / "step-000002")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=5e-5)
        moved += not torch.equal(ours[key], at_step_2[key])
    assert moved > len(ours) // 2  # the comparison is about trained weights, not untouched ones
    optimizer = torch.load(sharded / "step-000002" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(ours)  # the whole Adam state was gathered, not one shard
    ranks(flags(llama, data, resumed, 4, *common, "--train.devices", 2, "--train.strategy", "fsdp",
                "--resume", sharded / "step-000002"))
    for key, value in full_weights(resumed / "final").items():
        torch.testing.assert_close(value, ours[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("to", ["launcher", "terminal"])
def test_sigint_under_two_ranks_saves_one_checkpoint_and_resumes_exactly(tmp_path, llama, data, to):
    """Ctrl-C in a terminal reaches the launcher and both ranks (and the launcher passes it on: each
    rank gets it twice); `kill -INT` reaches the launcher only. Either way the ranks agree on one
    step, save it once, exit 130, and a resumed run ends with the uninterrupted run's weights."""
    common = ["--train.devices", 2, "--train.save_interval", 0, "--train.eval_interval", 0, "--lora.dropout", 0.1]
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", *map(str, flags(llama, data, out, 300, *common))],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for(out / "metrics.jsonl", process, timeout=180)
    if to == "terminal":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-3000:]
    saved = checkpoint.step_folders(out)
    assert len(saved) == 1 and checkpoint.verify(saved[0]) is None, saved
    step = int(saved[0].name[5:])
    assert 0 < step < 300
    assert stderr.count(f"SIGINT at step {step}: saved") == 1 and "Traceback" not in stderr, stderr[-3000:]
    if to == "launcher":
        return
    ranks(flags(llama, data, out, 300, *common, "--resume"))
    whole = tmp_path / "whole"
    ranks(flags(llama, data, whole, 300, *common))
    ours, theirs = adapter(out / "final"), adapter(whole / "final")
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
