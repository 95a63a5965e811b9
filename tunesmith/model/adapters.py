"""Turn a loaded model into the thing that trains: LoRA, QLoRA (LoRA on a 4-bit base), DoRA or
LLaMA-Adapter prompts through PEFT, or all weights.

With LoRA and bf16, frozen base weights are stored in bf16 once (half the memory, no per-step
cast) while the LoRA weights and their optimizer state stay fp32.
"""

from __future__ import annotations

import torch

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.log import say
from tunesmith.model.fused_lora import use_fused_lora


def load_for_training(location, config: RunConfig, device: str, dtype: torch.dtype):
    """The base model as the method needs it: 4-bit body for qlora, fp32 weights otherwise."""
    if config.weights == "qlora":
        from tunesmith.model.quantize import load_quantized

        return load_quantized(location, config.qlora, dtype, device)
    from tunesmith.model.load import load_model

    return load_model(location, dtype=torch.float32, device=device)


def prepare_for_training(model, config: RunConfig, dtype: torch.dtype):
    if config.weights == "full":
        model.requires_grad_(True)
        return model  # fp32 master weights; autocast runs the maths in dtype
    from peft import get_peft_model

    if dtype != torch.float32 and config.weights != "qlora":  # qlora loaded its frozen parts in dtype
        model.to(dtype)
    model.requires_grad_(False)
    model = get_peft_model(model, peft_config(config, model))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    use_fused_lora(model)  # PEFT's own forward wherever the fused one does not apply
    return model


# Architectures PEFT's adaption prompt (LLaMA-Adapter) knows how to wrap.
def adapter_architectures() -> list[str]:
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    return sorted(TRANSFORMERS_MODEL_CONFIG)


def peft_config(config: RunConfig, model):
    from peft import AdaptionPromptConfig, LoraConfig

    if config.weights == "adapter":
        model_type = model.config.model_type
        if model_type not in adapter_architectures():
            raise ConfigError(f"method=adapter: {model_type} models are not supported by LLaMA-Adapter prompts "
                              f"(supported: {', '.join(adapter_architectures())}); use method: lora or dora")
        layers = model.config.num_hidden_layers
        return AdaptionPromptConfig(adapter_len=config.adapter.length, task_type="CAUSAL_LM",
                                    adapter_layers=min(config.adapter.layers or layers, layers))
    lora = config.lora
    refuse_output_layer(lora.target_modules, model)
    dropout = lora.dropout
    if dropout and fused_experts(model):
        say(f"Note: lora.dropout {dropout:g} is off for this model: PEFT puts LoRA on its experts' fused weights, "
            "which take no dropout")
        dropout = 0.0
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM", bias="none",
                      use_dora=config.weights == "dora")


def fused_experts(model) -> bool:
    """A mixture-of-experts model whose experts are stored as one 3-D weight each (transformers 5)."""
    return any(parameter.dim() == 3 and ".experts." in name for name, parameter in model.named_parameters())


def refuse_output_layer(target_modules: str | list[str], model) -> None:
    """LoRA on the output layer would never train: the chunked loss multiplies by its weight directly
    (no logits for masked positions), past any adapter wrapped around it."""
    import re

    output = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is output), None)
    if output is None or name is None or target_modules == "all-linear":  # PEFT's all-linear leaves it out
        return
    if isinstance(target_modules, str):
        hit = re.fullmatch(target_modules, name) is not None
    else:
        hit = name.rsplit(".", 1)[-1] in target_modules or name in target_modules
    if hit:
        raise ConfigError(f"lora.target_modules includes the output layer {name}, which tunesmith's loss reads "
                          "directly, so its adapter would never train; leave it out (all-linear does)")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) weights; a 4-bit weight counts as one weight, not half a byte."""
    from tunesmith.model.quantize import true_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(true_numel(p) for p in model.parameters())
