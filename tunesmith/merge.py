"""`tunesmith merge RUN`: fold a LoRA / DoRA / QLoRA adapter into its base weights and write an
ordinary Hugging Face model directory that plain transformers loads (no PEFT needed).

A QLoRA adapter was trained against the 4-bit base, so it is folded into that base dequantized
(not into the original full-precision weights): the merged model computes what the trained one did.
The merge refuses to write anything when a merged weight is not finite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from tunesmith import config as config_module
from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.log import say
from tunesmith.model.load import LOADING, load_model, resolve
from tunesmith.train import checkpoint

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MergeError(TunesmithError):
    """The run cannot be merged (wrong method, broken adapter)."""


def base_for(run_config: RunConfig, device: str = "cpu"):
    """The base weights an adapter of this run was trained against, in fp32."""
    location = resolve(run_config.model)
    if run_config.weights == "qlora":
        from tunesmith.model.quantize import dequantize, load_quantized

        return dequantize(load_quantized(location, run_config.qlora, torch.float32, device))
    return load_model(location, dtype=torch.float32, device=device)


def load_tuned(folder: Path, run_config: RunConfig, device: str = "cpu"):
    """The fine-tuned model of an adapter checkpoint, for generation: merged where the adapter is a
    weight update (lora, dora, qlora), wrapped by PEFT where it is not (prompt adapters)."""
    from peft import PeftModel

    if run_config.weights == "adapter":
        base = base_for(run_config, device)
        with LOADING:
            return PeftModel.from_pretrained(base, str(folder))
    return merged_model(folder, run_config, device)


def merged_model(folder: Path, run_config: RunConfig, device: str = "cpu"):
    """Base + adapter folded into plain weights; raises MergeError when any merged weight is not finite."""
    from peft import PeftModel

    if run_config.weights == "full":
        raise MergeError(f"{folder} is a full fine-tune: it already is a complete model directory, nothing to merge")
    if run_config.weights == "adapter" or not checkpoint.is_adapter(folder):
        raise MergeError(f"{folder} holds {run_config.method!r} weights that are not a weight update "
                         "(LLaMA-Adapter prompts add attention to learned tokens); only lora, dora and qlora "
                         "adapters can be folded into the base")
    base = base_for(run_config, device)
    with LOADING:
        wrapped = PeftModel.from_pretrained(base, str(folder))
    try:
        model = wrapped.merge_and_unload(safe_merge=True)
    except ValueError as err:  # PEFT's safe merge found NaNs
        raise MergeError(f"{folder}: the merged weights are not finite ({err}); nothing was written") from None
    bad = first_non_finite(model)
    if bad:
        raise MergeError(f"{folder}: merged weight {bad} is not finite (inf or NaN); the adapter is broken, "
                         "nothing was written")
    return model


def first_non_finite(model) -> str | None:
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            return name
    return None


def write_model_dir(model, tokenizer, out_dir: Path, info: dict, dtype: torch.dtype = torch.float32) -> Path:
    """An HF model directory (safetensors, config, tokenizer, merge_info.json), written atomically."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to(dtype).save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "merge_info.json").write_text(json.dumps(info, indent=2))
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def merge_run(run: Path, out_dir: Path | None = None, dtype: str = "fp32") -> Path:
    """Merge the run's chosen checkpoint (best/, else final/) and write it; returns the directory."""
    from transformers import AutoTokenizer

    folder = checkpoint.pick(Path(run))
    run_config = config_module.load(folder / "config.yaml")
    out_dir = Path(out_dir) if out_dir else Path(run) / "merged"
    say(f"Merging the {run_config.method} adapter of {folder} into {run_config.model}")
    model = merged_model(folder, run_config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    info = {"source": str(folder.resolve()), "base_model": run_config.model, "method": run_config.method,
            "dtype": dtype, "template": run_config.data.template}
    return write_model_dir(model, tokenizer, out_dir, info, SAVE_DTYPES[dtype])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith merge",
                                     description="Fold a LoRA/DoRA/QLoRA adapter into the base weights and "
                                                 "write a Hugging Face model directory.")
    parser.add_argument("run", help="run directory or checkpoint folder")
    parser.add_argument("--out", help="output directory (default: RUN/merged)")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="fp32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    out_dir = merge_run(Path(args.run), Path(args.out) if args.out else None, args.dtype)
    print(f"Merged model written to {out_dir} (loads with transformers' AutoModelForCausalLM)")
    return 0
