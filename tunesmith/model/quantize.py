"""4-bit base weights for QLoRA, through bitsandbytes (CPU and CUDA).

Every linear layer of the transformer body is stored as 4-bit NF4 or FP4 codes in blocks of 64
weights, each block with its own scale (absmax). Double quantization stores those scales in 8 bits
too, with one fp32 scale per 256 of them. Embeddings, norms and the output layer stay in the run's
dtype. For the maths a layer is dequantized on the fly to the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import QloraConfig
from tunesmith.errors import ModelError, TunesmithError
from tunesmith.model.load import LOADING

BLOCK_SIZE = 64  # weights per 4-bit block (bitsandbytes' blocksize for 4-bit)
SCALE_BLOCK_SIZE = 256  # 8-bit scales per fp32 second-level scale under double quantization

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def require_bitsandbytes(what: str):
    """bitsandbytes, or a one-line error saying how to get it."""
    try:
        import bitsandbytes
    except ImportError:
        raise TunesmithError(f"{what} needs bitsandbytes: pip install 'tunesmith[quant]'") from None
    return bitsandbytes


def compute_dtype(qlora: QloraConfig, run_dtype: torch.dtype) -> torch.dtype:
    return run_dtype if qlora.compute_dtype == "auto" else DTYPES[qlora.compute_dtype]


def bnb_config(qlora: QloraConfig, run_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qlora.quant_type,
                              bnb_4bit_use_double_quant=qlora.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(qlora, run_dtype))


def load_quantized(location: Path | str, qlora: QloraConfig, run_dtype: torch.dtype, device: str = "cpu"):
    """The model with its body's linear layers in 4 bits, quantized while loading (the full-precision
    weights are never all in memory at once); everything else in run_dtype."""
    require_bitsandbytes("method: qlora")
    from transformers import AutoModelForCausalLM

    try:
        with LOADING:
            return AutoModelForCausalLM.from_pretrained(str(location), quantization_config=bnb_config(qlora, run_dtype),
                                                        dtype=run_dtype, device_map={"": device},
                                                        attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load {location} in 4 bits: {err}") from None


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    """name → module for every layer whose weight is stored in 4 bits."""
    bnb = require_bitsandbytes("4-bit layers")
    return {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def true_numel(parameter: torch.Tensor) -> int:
    """Weights a parameter stands for: a 4-bit one packs two per stored byte."""
    state = getattr(parameter, "quant_state", None)
    return int(state.shape.numel()) if state is not None else parameter.numel()


def quantized_bytes(n_weights: int, double_quant: bool) -> float:
    """Bytes a 4-bit matrix of n_weights takes: codes plus block scales (hand-checkable)."""
    blocks = n_weights / BLOCK_SIZE
    if double_quant:  # 8-bit scales + an fp32 scale per 256 of them (+ one fp32 offset)
        scales = blocks * 1 + blocks / SCALE_BLOCK_SIZE * 4 + 4
    else:
        scales = blocks * 4
    return n_weights / 2 + scales


def dequantize(model):
    """Replace every 4-bit layer by an ordinary fp32 linear layer holding its dequantized weights:
    the exact base a QLoRA adapter was trained against, ready to merge into."""
    model = model.dequantize()
    model.float()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
