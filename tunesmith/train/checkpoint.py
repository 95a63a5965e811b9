"""Checkpoint folders that explain themselves, written atomically, verified before use.

    step-000200/  adapter_model.safetensors + adapter_config.json (PEFT format), or an HF model
                  directory for full fine-tunes; tokenizer files; config.yaml (resolved);
                  trainer_state.json (step, losses, early-stopping state);
                  optimizer.pt + rng.safetensors (step-* only: what an exact resume needs);
                  manifest.json — SHA-256 of every file, written last: it marks the folder complete.

A folder is written under a temporary name, every file fsynced, then renamed into place, so a
crash or a kill leaves either the previous checkpoint or the new one, never half of one.
Loading is safe: weights only from safetensors, optimizer state with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import RunConfig, dump
from tunesmith.errors import TunesmithError

MANIFEST = "manifest.json"


class CheckpointError(TunesmithError):
    """A checkpoint cannot be written (disk) or read (missing, corrupted, unsafe)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_bytes(model, optimizer=None) -> int:
    """What a save writes, roughly: the saved weights plus optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = trainable if hasattr(model, "peft_config") else list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in weights)
    if optimizer is not None:
        total += sum(t.numel() * t.element_size() for state in optimizer.state.values()
                     for t in state.values() if torch.is_tensor(t))
    return total


def ensure_disk_space(folder: Path, needed_bytes: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    margin = needed_bytes * 1.1 + (64 << 20)  # tokenizer, config, filesystem slack
    if free < margin:
        raise CheckpointError(f"not enough disk space to save {folder.name} in {folder.parent}: it needs about "
                              f"{margin / 2**20:.0f} MB and {free / 2**20:.0f} MB are free; nothing was written")


def save(model, tokenizer, config: RunConfig, folder: Path, state: dict, optimizer=None) -> Path:
    ensure_disk_space(folder, checkpoint_bytes(model, optimizer))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "config.yaml").write_text(dump(config))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        _fsync(path)
    manifest = {"files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    _replace(tmp, folder)
    return folder


def _replace(tmp: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{index}"] = cuda_state
    return state


def verify(folder: Path) -> str | None:
    """None when the folder is complete and intact, else what is wrong with it."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "incomplete (no manifest.json: the save did not finish)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "corrupted (manifest.json is unreadable)"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"incomplete ({name} is missing)"
        if _sha256(path) != digest:
            return f"corrupted ({name} does not match its checksum)"
    return None


def is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and (folder / "trainer_state.json").is_file()


def step_folders(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def latest_resumable(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest step-* checkpoint that verifies, and a note for each newer one that did not."""
    notes = []
    for folder in reversed(step_folders(run_dir)):
        problem = verify(folder) or (None if (folder / "optimizer.pt").is_file() else "has no optimizer state")
        if problem is None:
            return folder, notes
        notes.append(f"{folder.name} is {problem}; skipped")
    raise CheckpointError(f"{run_dir} has no complete step-* checkpoint to resume from"
                          + (f" ({'; '.join(notes)})" if notes else "")
                          + "; train.save_interval sets how often they are written")


def restore(folder: Path, model, optimizer) -> dict:
    """Load trainable weights, optimizer and RNG state from `folder`; returns its trainer state."""
    problem = verify(folder)
    if problem:
        raise CheckpointError(f"{folder} is {problem}")
    _load_weights(folder, model)
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    except (pickle.UnpicklingError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'optimizer.pt'} cannot be loaded safely (only plain tensors are "
                              f"accepted, nothing is unpickled): {str(err).splitlines()[0]}") from None
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return json.loads((folder / "trainer_state.json").read_text())


def _load_weights(folder: Path, model) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if missing:
            raise CheckpointError(f"{folder}: adapter weights missing for {missing[:3]}")
        return
    from tunesmith.train.loss import unwrap

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "rng.safetensors":
            tensors.update(load_file(str(path)))
    result = unwrap(model).load_state_dict(tensors, strict=False)
    tied = {name for name, _ in unwrap(model).named_parameters(remove_duplicate=False)} - set(
        dict(unwrap(model).named_parameters()))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CheckpointError(f"{folder}: weights missing for {missing[:3]}")


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete step-* folders; best/ and final/ are separate and never pruned.
    Leftovers of interrupted saves (*.tmp, *.old) go too."""
    for leftover in list(run_dir.glob("*.tmp")) + list(run_dir.glob("*.old")):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = [p for p in step_folders(run_dir) if is_complete(p)]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def pick(run_dir: Path) -> Path:
    """The checkpoint a run stands for: best/ (lowest validation loss) when kept, else final/."""
    for name in ("best", "final"):
        if is_complete(run_dir / name):
            return run_dir / name
    if is_complete(run_dir):
        return run_dir  # a checkpoint folder given directly
    steps = [p for p in step_folders(run_dir) if is_complete(p)]
    if steps:
        return steps[-1]
    raise TunesmithError(f"{run_dir} holds no finished checkpoint (best/, final/ or step-*/)")
