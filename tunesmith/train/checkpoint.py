"""Checkpoint folders that explain themselves, written atomically.

    step-000200/  adapter_model.safetensors + adapter_config.json (PEFT format), or an HF model
                  directory for full fine-tunes; tokenizer files; config.yaml (resolved);
                  trainer_state.json (step, losses) — written last, it marks the folder complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tunesmith.config import RunConfig, dump


def save(model, tokenizer, config: RunConfig, folder: Path, state: dict) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "config.yaml").write_text(dump(config))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step-* folders; best/ and final/ are separate and never pruned."""
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def pick(run_dir: Path) -> Path:
    """The checkpoint a run stands for: best/ (lowest validation loss) when kept, else final/."""
    for name in ("best", "final"):
        if (run_dir / name / "trainer_state.json").is_file():
            return run_dir / name
    if (run_dir / "trainer_state.json").is_file():
        return run_dir  # a checkpoint folder given directly
    steps = sorted(run_dir.glob("step-*/trainer_state.json"))
    if steps:
        return steps[-1].parent
    from tunesmith.errors import TunesmithError

    raise TunesmithError(f"{run_dir} holds no finished checkpoint (best/, final/ or step-*/)")
