"""Checkpoint folders that explain themselves, written atomically, verified before use.

    step-000200/  adapter_model.safetensors + adapter_config.json (PEFT format), or an HF model
                  directory for full fine-tunes; tokenizer files; config.yaml (resolved);
                  trainer_state.json (step, losses, early-stopping state);
                  optimizer.pt + rng.safetensors (step-* only: what an exact resume needs; the
                  RNG state of every rank, and under FSDP the whole, unsharded optimizer state);
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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import RunConfig, dump
from tunesmith.errors import TunesmithError
from tunesmith.train.distributed import Group

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


def checkpoint_bytes(model, optimizer_state: dict | None = None) -> int:
    """What a save writes, roughly: the saved weights plus optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = trainable if hasattr(model, "peft_config") else list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in weights)  # a sharded weight's numel is the whole
    if optimizer_state is not None:
        total += sum(t.numel() * t.element_size() for state in optimizer_state["state"].values()
                     for t in state.values() if torch.is_tensor(t))
    return total


def ensure_disk_space(folder: Path, needed_bytes: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    margin = needed_bytes * 1.1 + (64 << 20)  # tokenizer, config, filesystem slack
    if free < margin:
        raise CheckpointError(f"not enough disk space to save {folder.name} in {folder.parent}: it needs about "
                              f"{margin / 2**20:.0f} MB and {free / 2**20:.0f} MB are free; nothing was written")


@dataclass
class Snapshot:
    """What a save needs from every rank, gathered before the main rank writes.

    weights: the whole model's state dict when it is sharded (FSDP), else None (the main rank
    holds it all); optimizer: its state dict (full, keyed by parameter name, when sharded);
    rng: every rank's random-number state (rank 0 under plain names, rank r as rank{r}/...)."""

    weights: dict | None = None
    optimizer: dict | None = None
    rng: dict[str, torch.Tensor] | None = None


def gather(model, optimizer, group: Group = Group()) -> Snapshot:
    """Called on every rank (it is a collective when the run has several)."""
    from tunesmith.train.distributed import is_sharded

    if not is_sharded(model):
        return Snapshot(optimizer=optimizer.state_dict() if optimizer is not None and group.is_main else None,
                        rng=_all_rng_states(group) if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from tunesmith.train.loss import unwrap

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on rank 0's CPU only
    tied = _tied_names(unwrap(model))  # saved once, as save_pretrained does for an unsharded model
    weights = {name: value for key, value in get_model_state_dict(model, options=full).items()
               if (name := key.removeprefix("model.")) not in tied}
    state = get_optimizer_state_dict(model, optimizer, options=full) if optimizer is not None else None
    rng = _all_rng_states(group) if optimizer is not None else None
    return Snapshot(weights, state, rng) if group.is_main else Snapshot()


def _all_rng_states(group: Group) -> dict[str, torch.Tensor]:
    from tunesmith.train.distributed import gather_objects

    states = {}
    for rank, mine in enumerate(gather_objects(group, _rng_state())):
        states.update({(key if rank == 0 else f"rank{rank}/{key}"): value for key, value in mine.items()})
    return states


def save(model, tokenizer, config: RunConfig, folder: Path, state: dict, snapshot: Snapshot = Snapshot()) -> Path:
    """Write a checkpoint folder atomically (main rank only; `snapshot` from gather())."""
    from tunesmith.train.loss import inner

    model = inner(model)
    ensure_disk_space(folder, checkpoint_bytes(model, snapshot.optimizer))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if snapshot.weights is not None:
        model.save_pretrained(str(tmp), state_dict=snapshot.weights, safe_serialization=True)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "config.yaml").write_text(dump(config))
    if snapshot.optimizer is not None:
        torch.save(snapshot.optimizer, tmp / "optimizer.pt")
    if snapshot.rng is not None:
        save_file(snapshot.rng, str(tmp / "rng.safetensors"))
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
    """tmp becomes folder. At every moment one complete copy exists under a name recover() knows:
    folder, else folder.old, else tmp. The parent is fsynced around the renames so they reach the
    disk in order."""
    old = folder.with_name(folder.name + ".old")
    _fsync(tmp)
    _fsync(folder.parent)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)  # a stale copy: folder is the complete one
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(run_dir: Path) -> list[str]:
    """After a crash between the two renames of _replace, put the newest complete copy back under
    its own name (X.tmp if it verifies, else X.old); what it did, for the log."""
    done = []
    for leftover in sorted(run_dir.glob("*.old")) + sorted(run_dir.glob("*.tmp")):
        target = leftover.with_suffix("")
        if target.exists() or not leftover.is_dir():
            continue
        newer = target.with_name(target.name + ".tmp")
        source = newer if newer.is_dir() and verify(newer) is None else leftover
        if verify(source) is None:
            os.replace(source, target)
            _fsync(run_dir)
            done.append(f"{target.name} restored from {source.name} (a save was interrupted)")
    return done


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
    notes = recover(run_dir)
    for folder in reversed(step_folders(run_dir)):
        problem = verify(folder) or (None if (folder / "optimizer.pt").is_file() else "has no optimizer state")
        if problem is None:
            return folder, notes
        notes.append(f"{folder.name} is {problem}; skipped")
    raise CheckpointError(f"{run_dir} has no complete step-* checkpoint to resume from"
                          + (f" ({'; '.join(notes)})" if notes else "")
                          + "; train.save_interval sets how often they are written")


def restore(folder: Path, model, optimizer, group: Group = Group()) -> dict:
    """Load trained weights, optimizer and this rank's RNG state from `folder` (every rank calls
    it); returns its trainer state."""
    from tunesmith.train.distributed import is_sharded

    problem = verify(folder)
    if problem:
        raise CheckpointError(f"{folder} is {problem}")
    try:
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'optimizer.pt'} cannot be loaded safely (only plain tensors are "
                              f"accepted, nothing is unpickled): {str(err).splitlines()[0]}") from None
    try:
        if is_sharded(model):
            _load_sharded(folder, model, optimizer, optimizer_state)
        else:
            _load_weights(folder, model)
            optimizer.load_state_dict(optimizer_state)
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{folder}: its weights or optimizer state do not fit this run's model "
                              f"({str(err).splitlines()[0]})") from None
    _set_rng_state(load_file(str(folder / "rng.safetensors")), group)
    return json.loads((folder / "trainer_state.json").read_text())


def _set_rng_state(saved: dict[str, torch.Tensor], group: Group) -> None:
    prefix = f"rank{group.rank}/"  # rank 0's states have no prefix
    mine = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
    if not mine:  # rank 0, or saved by fewer ranks than resume now: rank 0's stream
        mine = {key: value for key, value in saved.items() if "/" not in key}
    torch.set_rng_state(mine["torch_cpu"])
    cuda_states = [mine[k] for k in sorted(mine) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _full_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "rng.safetensors":
            tensors.update(load_file(str(path)))
    return tensors


def _tied_names(hf_model) -> set[str]:
    """Names under which a weight shared with another (tied embeddings) appears a second time."""
    return {name for name, _ in hf_model.named_parameters(remove_duplicate=False)} - set(
        dict(hf_model.named_parameters()))


def _load_sharded(folder: Path, root, optimizer, optimizer_state: dict) -> None:
    """FSDP: every rank reads the whole tensors and keeps its own shards of them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from tunesmith.train.loss import unwrap

    tensors = {f"model.{key}": value for key, value in _full_tensors(folder).items()}
    tied = {f"model.{name}" for name in _tied_names(unwrap(root))}
    expected = {name for name, _ in root.named_parameters()} - tied
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"{folder}: weights missing for {[m.removeprefix('model.') for m in missing[:3]]}")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(root, tensors, options=options)
    set_optimizer_state_dict(root, optimizer, optim_state_dict=optimizer_state, options=options)


def _load_weights(folder: Path, model) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if missing:
            raise CheckpointError(f"{folder}: adapter weights missing for {missing[:3]}")
        return
    from tunesmith.train.loss import unwrap

    result = unwrap(model).load_state_dict(_full_tensors(folder), strict=False)
    tied = _tied_names(unwrap(model))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CheckpointError(f"{folder}: weights missing for {missing[:3]}")


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete step-* folders; best/ and final/ are separate and never pruned.
    Leftovers of interrupted saves (*.tmp, *.old) go too, once recover() has kept what it needs."""
    recover(run_dir)
    for leftover in [*run_dir.glob("*.tmp"), *run_dir.glob("*.old"), *run_dir.glob("*.deleting")]:
        shutil.rmtree(leftover, ignore_errors=True)
    folders = step_folders(run_dir)
    complete = [p for p in folders if is_complete(p)]
    broken = [p for p in folders if complete and p < complete[-1] and not is_complete(p)]  # never resumed from
    for old in complete[:-keep] + broken:
        # Renamed first, then deleted: a kill half-way through leaves a *.deleting folder that the next
        # prune removes, never a half-deleted step-* that looks like a failed save and stays forever.
        doomed = old.with_name(old.name + ".deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def pick(run_dir: Path) -> Path:
    """The checkpoint a run stands for: best/ (lowest validation loss) when kept, else final/."""
    if run_dir.is_dir():
        recover(run_dir)
    for name in ("best", "final"):
        if is_complete(run_dir / name):
            return run_dir / name
    if is_complete(run_dir):
        return run_dir  # a checkpoint folder given directly
    steps = [p for p in step_folders(run_dir) if is_complete(p)]
    if steps:
        return steps[-1]
    raise TunesmithError(f"{run_dir} holds no finished checkpoint (best/, final/ or step-*/)")
