"""`tunesmith estimate CONFIG`: will it fit, what does a step cost, which batch size — before any
weight is loaded (the model is built on the meta device from its config alone).

Memory at the peak of a step, the start of backward, when all saved activations are alive:

    weights      frozen ones in the run dtype (4-bit codes + block scales for qlora), trained ones fp32
    gradients    fp32, one per trained weight
    optimizer    adamw 8 B/weight, adamw_8bit ~2 B (+ block scales), adafactor a row and a column per
                 matrix, sgd 4 B (momentum) or 0
    activations  what autograd keeps for backward, per token and layer (llama-style block: d = hidden,
                 kv = key/value width, i = MLP width, r = LoRA rank), in the compute dtype:
                   every layer      4d + 2kv + 3i   (norm inputs, rotated q/k, v, attention out, MLP)
                   trained weights  + the input of each trained linear (3d + i for all of them) and the
                                      normalised input of each trained norm (2d)
                   LoRA dropout     + for each adapted linear its dropped-out input and the dropout mask
                                      (2 x in; on CUDA the mask is 1 byte); + r for each
                   DoRA             + 2 x out per adapted linear (base output and LoRA output, kept for
                                      the magnitude gradient)
                 Gradient checkpointing keeps one d per layer plus one layer's worth.
    loss         the output layer runs on chunks of loss_chunk_size supervised positions: at most
                 3 x chunk x vocab floats (logits, log-softmax and their gradient) at a time
    CPU heap     unless train.compact_memory: the freed activation memory glibc keeps for reuse,
                 0.6 x activations less what gradient buffers take back from it (fitted, see HEAP_KEEPS)
Under train.strategy fsdp each of train.devices ranks holds 1/N of the weights, gradients and
optimizer state, plus two gathered layers (the running one and the next).
The worst case is assumed: every example max_seq_length tokens long, every token supervised.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import PAIRED_METHODS, RunConfig
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.load import LOADING
from tunesmith.train.loss import PIECE_BYTES, logit_transform

GiB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class Shape:
    """What the memory and FLOP formulas need from a model config."""

    layers: int
    hidden: int  # d
    kv_width: int  # kv_heads x head_dim
    intermediate: int  # i
    heads: int
    head_dim: int
    vocab: int
    tied: bool
    logit_transform: bool = False  # soft-capping or a logit scale: the loss cannot take its fused path


@dataclass
class Linear:
    name: str
    fan_in: int
    fan_out: int
    in_body: bool  # a transformer-layer linear (quantized by qlora; a LoRA target under all-linear)


@dataclass
class Inventory:
    """The model's weights, by kind, from the meta model."""

    shape: Shape
    linears: list[Linear]
    other_params: int  # embeddings, norms, biases (not body linear weights), output layer if untied
    head_params: int

    @property
    def total(self) -> int:
        return self.other_params + sum(lin.fan_in * lin.fan_out for lin in self.linears if lin.in_body)


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    memory: dict[str, float]  # component → bytes
    quantization_savings: float
    flops_per_token: float
    flops_per_step: float
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())


def model_config(spec: str):
    """The transformers config of a model spec, read without its weights."""
    from transformers import AutoConfig

    from tunesmith.model.load import ALIASES, _alias_file, cache_root, first_line

    path = _alias_file(spec) if spec in ALIASES else Path(spec).expanduser()
    try:
        if path.suffix == ".gguf":
            cached = [p for p in (cache_root() / "models").glob(f"{path.stem}-*") if (p / "config.json").is_file()]
            if cached:
                return AutoConfig.from_pretrained(str(cached[0]))
            if not path.is_file():
                raise ModelError(f"model file {path} not found")
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else spec)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config of {spec}: {first_line(err)}") from None


def meta_model(model_config_):
    from transformers import AutoModelForCausalLM

    with LOADING, torch.device("meta"):  # from_config swaps what from_pretrained does: one at a time
        return AutoModelForCausalLM.from_config(model_config_)


def inventory(model) -> Inventory:
    config = model.config
    head = model.get_output_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    tied = head.weight is model.get_input_embeddings().weight
    shape = Shape(config.num_hidden_layers, config.hidden_size, kv_heads * head_dim, intermediate, heads,
                  head_dim, head.weight.shape[0], tied, logit_transform(config) is not None)
    linears, linear_weights = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module is head or weight is None or weight.ndim != 2 or isinstance(module, torch.nn.Embedding):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            fan_in, fan_out = (weight.shape[1], weight.shape[0]) if isinstance(module, torch.nn.Linear) \
                else (weight.shape[0], weight.shape[1])
            linears.append(Linear(name, fan_in, fan_out, True))
            linear_weights.add(id(weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_weights)
    return Inventory(shape, linears, other, head.weight.numel())


def lora_targets(inv: Inventory, target_modules: str | list[str]) -> list[Linear]:
    """The linears PEFT adapts: all body linears, or those whose name ends with a listed name."""
    if target_modules == "all-linear":
        return [lin for lin in inv.linears if lin.in_body]
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    return [lin for lin in inv.linears if any(lin.name == n or lin.name.endswith("." + n) for n in names)]


def trainable_params(config: RunConfig, inv: Inventory) -> int:
    if config.weights == "full":
        return inv.total
    if config.weights == "adapter":
        layers = min(config.adapter.layers or inv.shape.layers, inv.shape.layers)
        return layers * (config.adapter.length * inv.shape.hidden + 1)  # prompt tokens + a zero-init gate
    targets = lora_targets(inv, config.lora.target_modules)
    count = sum(config.lora.r * (lin.fan_in + lin.fan_out) for lin in targets)
    if config.weights == "dora":
        count += sum(lin.fan_out for lin in targets)  # one magnitude per output row
    return count


def optimizer_bytes(name: str, config: RunConfig, inv: Inventory, trainable: int, device: str) -> float:
    from tunesmith.train.optim import UNPAGED

    if name in UNPAGED and not device.startswith("cuda"):
        name = UNPAGED[name]
    if name in ("adamw", "paged_adamw_32bit"):
        return 8.0 * trainable
    if name == "sgd":
        return 4.0 * trainable if config.train.momentum > 0 else 0.0
    shapes = trained_shapes(config, inv)
    if name == "adafactor":  # factored second moment for matrices, full for vectors; no first moment
        return sum(4.0 * (rows + cols) if cols > 1 else 4.0 * rows for rows, cols in shapes)
    # bitsandbytes 8-bit Adam: two 1-byte states and an fp32 scale per 256 values (+ two 256-entry
    # code tables) for tensors of 4096+ values; smaller ones keep fp32 states
    total = 0.0
    for rows, cols in shapes:
        n = rows * cols
        total += 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4 if n >= 4096 else 8.0 * n
    return total


def trained_shapes(config: RunConfig, inv: Inventory) -> list[tuple[int, int]]:
    """(rows, cols) of each trained tensor, for the optimizers whose state depends on shapes."""
    shape = inv.shape
    if config.weights == "full":
        shapes = [(lin.fan_out, lin.fan_in) for lin in inv.linears]
        shapes.append((shape.vocab, shape.hidden))
        if not shape.tied:
            shapes.append((shape.vocab, shape.hidden))
        shapes += [(shape.hidden, 1)] * (2 * shape.layers + 1)  # norm scales
        return shapes
    if config.weights == "adapter":
        layers = min(config.adapter.layers or shape.layers, shape.layers)
        return [(config.adapter.length, shape.hidden), (1, 1)] * layers
    shapes = []
    for lin in lora_targets(inv, config.lora.target_modules):
        shapes += [(config.lora.r, lin.fan_in), (lin.fan_out, config.lora.r)]
        if config.weights == "dora":
            shapes.append((lin.fan_out, 1))
    return shapes


def weight_bytes(config: RunConfig, inv: Inventory, trainable: int, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes of all weights, bytes saved by 4-bit storage)."""
    from tunesmith.model.quantize import quantized_bytes

    if config.weights == "full":
        return 4.0 * inv.total, 0.0  # fp32 master weights
    frozen_bytes = BYTES[dtype]
    if config.weights != "qlora":
        return frozen_bytes * inv.total + 4.0 * trainable, 0.0
    body = sum(lin.fan_in * lin.fan_out for lin in inv.linears if lin.in_body)
    packed = sum(quantized_bytes(lin.fan_in * lin.fan_out, config.qlora.double_quant)
                 for lin in inv.linears if lin.in_body)
    return frozen_bytes * inv.other_params + packed + 4.0 * trainable, frozen_bytes * body - packed


def activation_floats_per_token(config: RunConfig, inv: Inventory, device: str) -> float:
    """Values autograd keeps per token, summed over layers (see the module docstring)."""
    s = inv.shape
    d, kv, i = s.hidden, s.kv_width, s.intermediate
    every_layer = 4 * d + 2 * kv + 3 * i
    if config.weights == "full":
        per_layer, final = every_layer + (3 * d + i) + 2 * d, 4 * d
    elif config.weights == "adapter":
        per_layer = every_layer + d + 3 * s.heads * config.adapter.length
        final = 2 * d
    else:
        per_layer, final = every_layer + lora_extra(config, inv, device), 2 * d
    if config.train.gradient_checkpointing:
        return s.layers * d + per_layer + final
    return s.layers * per_layer + final


def lora_extra(config: RunConfig, inv: Inventory, device: str) -> float:
    """Per layer: what adapted linears keep (their inputs, dropout copies, LoRA and DoRA outputs)."""
    targets = lora_targets(inv, config.lora.target_modules)
    per_layer = [lin for lin in targets if lin.in_body]
    share = len(per_layer) / max(inv.shape.layers, 1)  # adapted linears per layer
    fan_in = sum(lin.fan_in for lin in per_layer) / max(inv.shape.layers, 1)
    fan_out = sum(lin.fan_out for lin in per_layer) / max(inv.shape.layers, 1)
    if config.lora.dropout > 0:
        mask = 0.25 if device.startswith("cuda") else 1.0  # CUDA keeps a bool mask, CPU a float one
        extra = (1 + mask) * fan_in
    else:  # the inputs are shared by the linears that read them: qkv, o, gate+up, down
        s = inv.shape
        extra = min(fan_in, 3 * s.hidden + s.intermediate)
    extra += share * config.lora.r
    if config.weights == "dora":
        extra += 2 * fan_out
    return extra


# glibc's heap keeps freed activation blocks for reuse (train.compact_memory hands them back); the
# gradient buffers of a full fine-tune are carved from that same free space. Fitted on SmolLM2-135M,
# micro batch 4 x 256 (bench/estimate_accuracy.py): kept = 0.6 x activations - gradients gives full
# 316 MiB, LoRA and QLoRA 1207, against measured gaps (default minus compact allocator, two runs)
# of 278-395, 1074-1139 and 1314-1321 MiB.
HEAP_KEEPS = 0.6


def step_memory(config: RunConfig, inv: Inventory, micro_batch: int, dtype: torch.dtype, device: str,
                trainable: int) -> dict[str, float]:
    # A pair is two sequences. The reference model of dpo/kto costs no memory: the adapter switched
    # off, or (full) log-probs computed once before training.
    sequences = micro_batch * (2 if config.objective in PAIRED_METHODS else 1)
    tokens = sequences * config.data.max_seq_length
    activation_bytes = BYTES[dtype]
    chunk = min(config.train.loss_chunk_size, tokens)
    weights, _ = weight_bytes(config, inv, trainable, dtype)
    memory = {"weights": weights, "gradients": 4.0 * trainable,
              "optimizer state": optimizer_bytes(config.train.optimizer, config, inv, trainable, device),
              "activations": activation_floats_per_token(config, inv, device) * tokens * activation_bytes,
              "loss (output layer chunks)": loss_bytes(inv.shape, chunk, tokens, dtype)}
    ranks = fsdp_ranks(config)
    if ranks > 1:  # each rank keeps 1/N of these, plus the layer being gathered and the next one
        layer = 4.0 * sum(lin.fan_in * lin.fan_out for lin in inv.linears if lin.in_body) / inv.shape.layers
        memory["weights"] = memory["weights"] / ranks + 2 * layer
        memory["gradients"] /= ranks
        memory["optimizer state"] /= ranks
    if device.startswith("cuda"):
        memory["CUDA context"] = 0.5 * GiB
    elif not config.train.compact_memory:
        memory["freed memory the CPU allocator keeps"] = max(
            0.0, HEAP_KEEPS * memory["activations"] - memory["gradients"])
    return memory


def loss_bytes(shape: Shape, chunk: int, tokens: int, dtype: torch.dtype) -> float:
    """The output layer's loss. Fused (fp32, no logit transform): one piece of logits, turned into
    its gradient in place, and the gradient of the gathered hidden states. Otherwise each chunk's
    logits, their log-softmax and its gradient, recomputed in backward."""
    if dtype == torch.float32 and not shape.logit_transform:
        piece = max(8, min(chunk, PIECE_BYTES // (4 * shape.vocab)))
        return 4.0 * piece * shape.vocab + 4.0 * tokens * shape.hidden
    return 3.0 * 4 * chunk * shape.vocab


def fsdp_ranks(config: RunConfig) -> int:
    """How many ranks share the weights: train.devices under strategy fsdp, else 1 (ddp copies them)."""
    return config.train.devices if config.train.strategy == "fsdp" else 1


def flops_per_token(config: RunConfig, inv: Inventory, trainable: int) -> float:
    """Training FLOPs per supervised token, as train/flops.py counts them for MFU."""
    s = inv.shape
    embed = s.vocab * s.hidden
    body = inv.total - embed - (0 if s.tied else inv.head_params)
    if config.weights == "full":
        body_flops = 6 * body
        head = 6 * inv.head_params
    else:
        body_flops = 4 * body + 6 * trainable
        head = 4 * inv.head_params
    mean_pairs = (config.data.max_seq_length + 1) / 2  # causal: token t attends to t + 1 positions
    attention = 3 * 4 * s.layers * s.heads * s.head_dim * mean_pairs
    return float(body_flops + head + attention)


def estimate(config: RunConfig, model_config_=None, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> Estimate:
    model_config_ = model_config_ or model_config(config.model)
    inv = inventory(meta_model(model_config_))
    trainable = trainable_params(config, inv)
    _, savings = weight_bytes(config, inv, trainable, dtype)
    tokens_per_step = config.train.batch_size * config.data.max_seq_length
    per_token = flops_per_token(config, inv, trainable)
    memory = step_memory(config, inv, config.train.micro_batch_size, dtype, device, trainable)
    return Estimate(inv.total, trainable, memory, savings, per_token, per_token * tokens_per_step, tokens_per_step)


def largest_micro_batch(config: RunConfig, model_config_, budget: float, device: str, dtype: torch.dtype,
                        limit: int = 4096) -> int:
    """The largest micro_batch_size whose step fits in `budget` bytes (0 if even 1 does not)."""
    inv = inventory(meta_model(model_config_))
    trainable = trainable_params(config, inv)
    best = 0
    for micro in range(1, limit + 1):
        if sum(step_memory(config, inv, micro, dtype, device, trainable).values()) > budget:
            break
        best = micro
    return best


def suggest_batch(batch_size: int, largest_micro: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation): the largest micro batch that fits and divides batch_size."""
    micro = max((m for m in range(1, min(batch_size, largest_micro) + 1) if batch_size % m == 0), default=1)
    return micro, batch_size // micro


def scaled_learning_rate(base_lr: float, supervised_tokens_per_batch: float, pretrain_batch_tokens: float) -> float:
    """The rule of thumb: the pre-training rate scaled by sqrt(your batch tokens / its batch tokens)."""
    return base_lr * math.sqrt(supervised_tokens_per_batch / pretrain_batch_tokens)


UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str, what: str = "--memory") -> float:
    """'24GB', '24 GiB', '512MB', '1.5T' → bytes (binary units, as device memory is quoted)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"{what}={text!r}: give a size like 24GB, 80GiB or 512MB")
    return float(match.group(1)) * UNITS[match.group(2).lower()]


def parse_count(text: str, what: str) -> float:
    """'2M', '4e6', '512k' → a number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbB]?)\s*", text)
    if not match:
        raise ConfigError(f"{what}={text!r}: give a number like 4e6, 4M or 512k")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]


def available_memory(device: str) -> tuple[float, str]:
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return float(props.total_memory), f"{props.name} ({props.total_memory / GiB:.1f} GiB)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
                return available, f"this machine's available memory ({available / GiB:.1f} GiB)"
    except OSError:
        pass
    raise ConfigError("cannot tell this machine's memory: give --memory, e.g. --memory 24GB")


def prepared_stats(config: RunConfig) -> dict | None:
    """Mean tokens and supervised tokens per example of the run's prepared training split, if any."""
    from tunesmith.data.dataset import TokenizedSplit

    folder = config.run_dir / "data" / "train"
    if not (folder / "tokens.safetensors").is_file():
        return None
    split = TokenizedSplit.load(folder)
    if len(split) == 0:
        return None
    return {"examples": len(split), "tokens": float(split.lengths.float().mean()),
            "supervised": float(split.target_counts().float().mean())}


def split_flags(argv: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Take `--name value` / `--name=value` for the estimate's own flags; the rest are config."""
    own, rest, index = {}, [], 0
    while index < len(argv):
        flag = argv[index]
        key = flag[2:].split("=", 1)[0] if flag.startswith("--") else None
        if key in names:
            if "=" in flag:
                own[key] = flag.split("=", 1)[1]
                index += 1
            elif index + 1 < len(argv):
                own[key] = argv[index + 1]
                index += 2
            else:
                raise ConfigError(f"--{key} needs a value")
            continue
        rest.append(flag)
        index += 1
    return own, rest


def report(config: RunConfig, result: Estimate, budget: float, budget_text: str, largest: int,
           device: str, dtype: torch.dtype) -> list[str]:
    share = 100 * result.trainable_params / max(result.total_params, 1)
    lines = [f"Model {config.model}, method {config.method}, on {device} in {str(dtype).replace('torch.', '')}",
             (f"  parameters    {result.total_params / 1e6:10.2f} M total, "
              f"{result.trainable_params / 1e6:.3f} M trained ({share:.2f}%)"),
             (f"Memory at the peak of a step (micro batch {config.train.micro_batch_size} x "
              f"{config.data.max_seq_length} tokens, every token supervised)"
              + (f", per rank of {fsdp_ranks(config)} (fsdp):" if fsdp_ranks(config) > 1 else ":"))]
    for component, value in result.memory.items():
        lines.append(f"  {component:28} {value / 2**20:10.1f} MiB")
    if result.quantization_savings:
        lines.append(f"  {'(4-bit storage saves)':28} {result.quantization_savings / 2**20:10.1f} MiB")
    peak = result.peak_bytes
    lines.append(f"  {'total':28} {peak / 2**20:10.1f} MiB")
    lines.append(f"Compute: {result.flops_per_token / 1e9:.3f} GFLOP per token, "
                 f"{result.flops_per_step / 1e12:.3f} TFLOP per step of {result.tokens_per_step} tokens")
    verdict = "fits" if peak <= budget else "does NOT fit"
    lines.append(f"Device memory: {budget_text}: the configured step {verdict} "
                 f"({100 * peak / budget:.0f}% of it)")
    if largest == 0:
        lines.append("  Even micro_batch_size 1 does not fit: try method: qlora, train.gradient_checkpointing: "
                     "true, or a shorter data.max_seq_length")
    else:
        micro, accumulation = suggest_batch(config.train.batch_size, largest)
        lines.append(f"  largest micro_batch_size that fits: {largest}")
        lines.append(f"  suggested: batch_size {config.train.batch_size} = micro_batch_size {micro} x "
                     f"{accumulation} accumulation steps")
    return lines


def main(argv: list[str]) -> int:
    from tunesmith.config import from_args, keys_help
    from tunesmith.device import pick_device, pick_dtype

    if "-h" in argv or "--help" in argv:
        print("usage: tunesmith estimate [CONFIG.yaml | RUN_DIR] [--section.key value ...] [--memory SIZE]\n")
        print("\n".join(keys_help()))
        print("\nestimate's own flags:\n  --memory SIZE                      device memory to fit in (24GB, 80GiB, 512MB; "
              "default: the GPU's, or this machine's available RAM)\n  --pretrain-lr LR                   the base "
              "model's pre-training peak learning rate\n  --pretrain-batch-tokens N          its pre-training batch "
              "in tokens (4M, 2e6): with --pretrain-lr, prints the scaled learning rate")
        return 0
    own, rest = split_flags(argv, ("memory", "pretrain-lr", "pretrain-batch-tokens"))
    config = from_args(rest)
    device = str(pick_device(config.train.device))
    dtype = pick_dtype(config.train.precision, torch.device(device))
    model_config_ = model_config(config.model)
    result = estimate(config, model_config_, device, dtype)
    budget, budget_text = (parse_size(own["memory"]), f"--memory {own['memory']}") if "memory" in own \
        else available_memory(device)
    largest = largest_micro_batch(config, model_config_, budget, device, dtype)
    for line in report(config, result, budget, budget_text, largest, device, dtype):
        print(line)
    print_learning_rate(config, own)
    return 0


def print_learning_rate(config: RunConfig, own: dict[str, str]) -> None:
    stats = prepared_stats(config)
    if stats:
        print(f"Prepared data: {stats['examples']} training examples, mean {stats['tokens']:.0f} tokens and "
              f"{stats['supervised']:.0f} supervised tokens each")
    if "pretrain-lr" not in own or "pretrain-batch-tokens" not in own:
        if "pretrain-lr" in own or "pretrain-batch-tokens" in own:
            raise ConfigError("give both --pretrain-lr and --pretrain-batch-tokens for the learning-rate rule")
        return
    base_lr = parse_count(own["pretrain-lr"], "--pretrain-lr")
    pretrain_tokens = parse_count(own["pretrain-batch-tokens"], "--pretrain-batch-tokens")
    per_example = stats["supervised"] if stats else config.data.max_seq_length
    supervised = config.train.batch_size * per_example
    rate = scaled_learning_rate(base_lr, supervised, pretrain_tokens)
    source = "prepared data" if stats else "every token supervised; prepare the data for a closer figure"
    print(f"Learning rate rule of thumb: {base_lr:g} x sqrt({supervised:.0f} supervised tokens per batch / "
          f"{pretrain_tokens:.0f} pre-training batch tokens) = {rate:.2e}  ({source}; "
          f"configured: {config.train.learning_rate:g})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
