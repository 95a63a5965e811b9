"""Turn a loaded model into the thing that trains: LoRA through PEFT, or all weights.

With LoRA and bf16, frozen base weights are stored in bf16 once (half the memory, no per-step
cast) while the LoRA weights and their optimizer state stay fp32.
"""

from __future__ import annotations

import torch

from tunesmith.config import RunConfig


def prepare_for_training(model, config: RunConfig, dtype: torch.dtype):
    if config.method == "full":
        model.requires_grad_(True)
        return model  # fp32 master weights; autocast runs the maths in dtype
    from peft import LoraConfig, get_peft_model

    if dtype != torch.float32:
        model.to(dtype)
    lora = config.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, peft_config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
