"""Which attention over packed rows and which output-layer loss a run uses, decided once at start
and said out loud (train.attention, train.loss_kernel).

Attention over a packed row (each example sees only itself):
    per_example   SDPA on each example's piece in turn (train/attention.py): the CPU's choice, and
                  the fallback everywhere; the only one that shares a prompt prefix
    flash_varlen  FlashAttention's variable-length kernel (flash_attn 2, or flash_attn_interface 3),
                  CUDA in bf16/fp16 (train/varlen_cuda.py)
    flex          PyTorch's flex attention with a per-example (document) block mask, compiled; CUDA
    transformers  transformers' own attention, which reads packing from the restarting position ids;
                  the only one for models with attention logit soft-capping (Gemma 2)
auto: CPU → per_example; CUDA → flash_varlen where installed and the run is bf16/fp16, else flex,
else per_example.

The output layer's loss:
    chunked  tunesmith's own (train/loss.py): a fused fp32 kernel on CPU, checkpointed chunks elsewhere
    liger    Liger's fused linear cross-entropy (liger-kernel, Triton; CUDA)
    cce      Apple's cut cross-entropy (cut-cross-entropy, Triton; CUDA)
Both fused ones take soft-capping but not a logit scale; cce takes no output-layer bias. Either is
used for the supervised loss only; preference objectives' per-token log-probs stay chunked.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from tunesmith.errors import ConfigError
from tunesmith.train import attention, varlen_cuda

ATTENTION_BACKENDS = ("auto", "per_example", "flash_varlen", "flex", "transformers")
LOSS_KERNELS = ("chunked", "liger", "cce")
CHOICE_ATTRIBUTE = "tunesmith_kernels"  # where the run's choice sits on the transformers model (not its config)
LOSS_PACKAGES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
LOSS_PIP = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}


@dataclass(frozen=True)
class Kernels:
    attention: str  # per_example | flash_varlen | flex | transformers
    reason: str  # why, for the start-of-run line
    loss: str = "chunked"

    def describe(self) -> str:
        return f"Attention over packed rows: {self.attention} ({self.reason}); output-layer loss: {self.loss}"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@cache  # what is installed does not change while a run goes; chosen() asks once per micro batch
def have_flash() -> bool:
    return installed("flash_attn_interface") or installed("flash_attn")


@cache
def have_flex() -> bool:
    return installed("torch.nn.attention.flex_attention")


def softcaps_attention(model_config) -> bool:
    return getattr(model_config, "attn_logit_softcapping", None) is not None


def pick_attention(requested: str, device_type: str, dtype: torch.dtype | None, softcap: bool,
                   flash: bool, flex: bool) -> tuple[str, str]:
    """(backend, reason) for this run; ConfigError for a backend that cannot serve it."""
    if softcap:
        if requested not in ("auto", "transformers"):
            raise ConfigError(f"train.attention={requested}: this model soft-caps its attention logits, which only "
                              "transformers' attention applies; use auto or transformers")
        return "transformers", "the model soft-caps attention logits"
    if requested == "auto":
        if device_type != "cuda":
            return "per_example", "CPU: SDPA on each example, where the maths dominates"
        if flash and dtype in (torch.bfloat16, torch.float16):
            return "flash_varlen", "FlashAttention is installed"
        if flex:
            return "flex", "CUDA: PyTorch's flex attention with a per-example mask (FlashAttention not installed)"
        return "per_example", "CUDA without FlashAttention or flex attention"
    problem = _unavailable(requested, device_type, dtype, flash, flex)
    if problem:
        raise ConfigError(f"train.attention={requested}: {problem}")
    return requested, "asked for in train.attention"


def _unavailable(backend: str, device_type: str, dtype: torch.dtype | None, flash: bool, flex: bool) -> str | None:
    """Why `backend` cannot run here, or None; dtype None: not known yet (not held against it)."""
    if backend == "flash_varlen":
        if not flash:
            return "FlashAttention is not installed (pip install flash-attn)"
        if device_type != "cuda" or dtype not in (None, torch.bfloat16, torch.float16):
            return "FlashAttention runs on CUDA in bf16 or fp16 only"
    if backend == "flex":
        if not flex:
            return f"this PyTorch ({torch.__version__}) has no flex attention"
        if device_type != "cuda":
            return "PyTorch's flex attention trains on CUDA only (it has no CPU backward)"
    return None


def check_loss_kernel(kernel: str, device_type: str, model_config) -> None:
    """ConfigError where the fused loss asked for cannot run this model here."""
    if kernel == "chunked":
        return
    where = f"train.loss_kernel={kernel}"
    if device_type != "cuda":
        raise ConfigError(f"{where} runs on CUDA only (a Triton kernel); use chunked on this machine")
    if not installed(LOSS_PACKAGES[kernel]):
        raise ConfigError(f"{where}: {LOSS_PIP[kernel]} is not installed (pip install 'tunesmith[gpu]')")
    if getattr(model_config, "logit_scale", None) is not None or getattr(model_config, "logits_scaling", None):
        raise ConfigError(f"{where}: this model scales its logits, which the fused kernels do not; use chunked")


def choose(hf_model, attention: str = "auto", loss: str = "chunked") -> Kernels:
    """Decide for this model (on its device, in its dtype) and remember the decision on it."""
    backend, reason = _pick_for(hf_model, attention)
    check_loss_kernel(loss, next(hf_model.parameters()).device.type, hf_model.config)
    output = hf_model.get_output_embeddings()
    if loss == "cce" and getattr(output, "bias", None) is not None:
        raise ConfigError("train.loss_kernel=cce: this model's output layer has a bias, which cut cross-entropy "
                          "does not take; use liger or chunked")
    kernels = Kernels(backend, reason, loss)
    setattr(hf_model, CHOICE_ATTRIBUTE, kernels)
    return kernels


def chosen(hf_model) -> Kernels:
    """The run's decision; a model no run decided for (evaluate, a test) gets auto's."""
    kernels = getattr(hf_model, CHOICE_ATTRIBUTE, None)
    return Kernels(*_pick_for(hf_model, "auto")) if kernels is None else kernels


def _pick_for(hf_model, requested: str) -> tuple[str, str]:
    device_type = next(hf_model.parameters()).device.type
    return pick_attention(requested, device_type, _compute_dtype(hf_model), softcaps_attention(hf_model.config),
                          have_flash(), have_flex())


def loss_kernel(hf_model) -> str:
    kernels = getattr(hf_model, CHOICE_ATTRIBUTE, None)
    return "chunked" if kernels is None else kernels.loss


def check_requested(attention_backend: str, loss: str, device: torch.device) -> None:
    """What can be refused before anything is written: a backend or kernel this machine cannot run
    (the run's dtype and the model's own settings are checked by choose(), once the model is loaded)."""
    pick_attention(attention_backend, device.type, None, False, have_flash(), have_flex())
    check_loss_kernel(loss, device.type, None)


def shares_prefixes(hf_model) -> bool:
    """Whether packed rows for this model may hold a shared prefix: the per-example loop runs and no
    layer has a sliding window (a window would have to count the prefix's tokens too)."""
    config = hf_model.config
    sliding = getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None)
                                                                                   or ())
    return chosen(hf_model).attention == "per_example" and not sliding


IMPLEMENTATIONS = {"per_example": attention.VARLEN, "flash_varlen": varlen_cuda.FLASH, "flex": varlen_cuda.FLEX}


@contextmanager
def packed_attention(hf_model):
    """The model's attention switched to the chosen packed-row backend for the forwards (and backwards)
    inside; yields False where transformers' own attention stays."""
    backend = chosen(hf_model).attention
    if backend == "transformers":
        yield False
        return
    attention.register()
    varlen_cuda.register()
    config = hf_model.config
    previous = config._attn_implementation
    config._attn_implementation = IMPLEMENTATIONS[backend]
    try:
        yield True
    finally:
        config._attn_implementation = previous


def _compute_dtype(hf_model) -> torch.dtype:
    """The dtype attention runs in: bf16/fp16 weights, or fp32 ones (autocast narrows them on CUDA runs
    whose precision is bf16: then the frozen weights are bf16 too, see model/load.py)."""
    return getattr(hf_model, "dtype", None) or next(hf_model.parameters()).dtype


def fused_loss_sum(kernel: str, hidden: torch.Tensor, output_layer, targets: torch.Tensor,
                   softcap: float | None) -> torch.Tensor:
    """Summed cross-entropy of output_layer(hidden) against targets through a fused CUDA kernel."""
    weight, bias = output_layer.weight, output_layer.bias
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum", softcap=softcap)
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, softcap=softcap, reduction="sum").float()
