"""Training speed and memory, side by side: tunesmith against TRL's SFTTrainer (+ PEFT), on three
workload shapes.

    .venv/bin/python bench/train_speed.py [--shape short|mixed|long|all] [--steps N] [--runs a,b,...]

Shapes (SHAPES): short uniform rows (about 50 tokens with the chat template, 8 per step, max
length 512), mixed rows (log-normal, median 80 tokens, a long tail to 512; 8 per step) and long
rows (1,000-2,000 tokens, 2 per step, max length 2,048). Everyone does the same work: SmolLM2-135M-Instruct
(the embedded model, no hub access), LoRA r=16 alpha=32 dropout 0 on every linear layer, AdamW at
a constant 2e-4 with gradient clipping at 1.0, the prompt masked (completions only), in the
precision tunesmith's `precision: auto` picks for this machine (bf16 only where a bf16 matmul
measures faster), plus a row of each tool in the other precision: bf16 where the hardware has bf16
instructions but auto picks fp32, fp32 where auto picks bf16. The data
is synthetic question/answer JSONL with the shape's lengths.

tunesmith tokenizes it with its own `prepare`; TRL receives exactly those token ids and
completion masks as a pre-tokenized dataset, in the order tunesmith's seeded step plan visits
them, one step per 8 examples (a sequential sampler). So, except where packing regroups rows,
both train on the same examples in the same steps.

Each run is its own process, so its peak memory (RSS of the process on CPU, the largest
allocated CUDA memory on a GPU) is its own. Step 1 is a warm-up and is not timed; the timed part
is steps 2..N+1: for TRL the time between the ends of step 1 and step N+1 (a trainer callback),
for tunesmith the sum of the per-step windows its loop logs in metrics.jsonl. Both include
building each step's batch from tokens. Model loading, data preparation and saving are outside
the timed part but inside the wall time.

Throughput counts real tokens (padding never counts), supervised tokens are those the loss is
taken on, and MFU is tunesmith's FlopModel (useful FLOPs: no padding, output layer only at
supervised positions) over a dense-matmul peak this script measures with measure_peak_flops (the
best of several windows, measured again after every run, the highest kept). Each shape writes
its own section of RESULTS.md; a summary section puts tunesmith's default run against TRL's
fastest setting for each shape. bench/profile_step.py shows where a tunesmith step goes for a
shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from processes import cpu_model, last_error, run_measured  # bench/ is on the path of a script run from it

from tunesmith.config import RunConfig, build
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.device import cpu_has_bf16, pick_device, pick_dtype
from tunesmith.model.load import resolve
from tunesmith.train.batching import StepPlan

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
SEED = 42
LEARNING_RATE = 2e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
TAIL_STEPS = 3  # final loss = mean of the last this-many step losses
CHILD_TIMEOUT_SECONDS = 4 * 3600
RESULTS_BEGIN, RESULTS_END = "<!-- train_speed:begin -->", "<!-- train_speed:end -->"


@dataclass(frozen=True)
class Shape:
    """A workload: how long the rows are, how many go into a step, the length they are cut at."""
    name: str
    about: str  # what a reader sees
    batch: int  # sequences per optimizer step, for everyone
    max_length: int
    median: int  # prompt+response tokens of a row (log-normal around this) ...
    sigma: float  # ... with this spread
    least: int  # and clipped to [least, most]
    most: int
    steps: int  # timed steps by default


SHAPES = {
    "short": Shape("short", "short uniform rows (about 50 tokens with the chat template)", 8, 512, 18, 0.25, 8, 40,
                   12),
    "mixed": Shape("mixed", "mixed rows (log-normal, median 80 tokens, a long tail to 512)", 8, 512, 80, 0.8, 20,
                   10**9, 6),
    "long": Shape("long", "long rows (1,000-2,000 tokens)", 2, 2048, 1400, 0.25, 1000, 2000, 3),
}


@dataclass(frozen=True)
class Variant:
    name: str
    tool: str  # tunesmith | trl
    settings: str  # what a reader sees in the table
    gradient_checkpointing: bool = False
    batching: str = "packed"  # tunesmith: packed | padded;  trl: padded | padding_free | packing
    loss_chunk_size: int = 1024  # tunesmith only
    compact_memory: bool = False  # tunesmith only
    compile: bool = False  # tunesmith only
    precision: str = "auto"  # auto (tunesmith's pick, for everyone) | bf16 | fp32: the other precision's rows
    core: bool = True  # run by default (the others: --runs NAME or --runs all)
    method: str = "lora"  # lora | qlora (4-bit frozen weights, bitsandbytes)
    attention: str = "auto"  # tunesmith only: train.attention
    loss_kernel: str = "chunked"  # tunesmith only: train.loss_kernel


VARIANTS = [
    Variant("tunesmith", "tunesmith", "defaults: packed rows, chunked loss, no checkpointing"),
    Variant("tunesmith-gc", "tunesmith", "+ gradient checkpointing", gradient_checkpointing=True),
    Variant("tunesmith-compact", "tunesmith", "+ train.compact_memory (freed memory back to the OS at once)",
            compact_memory=True, core=False),
    Variant("tunesmith-compile", "tunesmith", "+ train.compile (torch.compile of each layer; compile time not timed)",
            compile=True, core=False),
    Variant("tunesmith-padded", "tunesmith", "padded batches (emulated), no checkpointing",
            batching="padded", core=False),
    Variant("tunesmith-one-chunk", "tunesmith", "loss in one chunk (not chunked), no checkpointing",
            loss_chunk_size=10**9, core=False),
    Variant("tunesmith-bf16", "tunesmith", "defaults, bf16 weights and maths (precision bf16)", precision="bf16"),
    Variant("trl-padded-gc", "trl", "padded batches, gradient checkpointing (TRL's default)",
            gradient_checkpointing=True, batching="padded"),
    Variant("trl-padded", "trl", "padded batches, no checkpointing", batching="padded"),
    Variant("trl-padding-free", "trl", "padding_free, no checkpointing", batching="padding_free"),
    Variant("trl-padding-free-gc", "trl", "padding_free, gradient checkpointing",
            gradient_checkpointing=True, batching="padding_free"),
    Variant("trl-packing", "trl", "packing (bfd, rows of max length), no checkpointing", batching="packing"),
    Variant("trl-packing-gc", "trl", "packing (bfd, rows of max length), gradient checkpointing",
            gradient_checkpointing=True, batching="packing"),
    Variant("trl-padding-free-bf16", "trl", "padding_free, no checkpointing, bf16", batching="padding_free",
            precision="bf16"),
    # where precision auto picks bf16 (a CPU whose bf16 matmul measures faster, a GPU), fp32 is the other one
    Variant("tunesmith-fp32", "tunesmith", "defaults, fp32 weights and maths (precision fp32)", precision="fp32"),
    Variant("trl-packing-fp32", "trl", "packing (bfd, rows of max length), no checkpointing, fp32",
            batching="packing", precision="fp32"),
]


# ---------------------------------------------------------------------------------------------
# Synthetic data: question/answer rows whose token lengths are log-normal, like real SFT sets.

SUBJECTS = ["the database index", "a rainwater tank", "the compiler", "our billing service",
            "the garden hose", "a solar panel", "the city library", "the login page", "a sourdough starter",
            "the bicycle chain", "the cache layer", "a heat pump", "the vaccine schedule", "the river ferry",
            "a message queue", "the spreadsheet", "the school timetable", "a kitchen knife",
            "the load balancer", "the tax form"]
VERBS = ["slows down", "protects", "replaces", "depends on", "measures", "cleans", "stores", "rejects",
         "updates", "warms", "connects to", "reports on", "shrinks", "checks", "schedules", "explains"]
OBJECTS = ["every request", "the old records", "a small amount of water", "the morning traffic",
           "its neighbours", "the weekly report", "unused memory", "the customer's order", "fresh bread",
           "a broken link", "the first result", "several thousand rows", "the quiet hours", "the new policy",
           "each visitor"]
LINKS = ["because", "so that", "while", "after", "before", "unless", "when", "and then", "even though"]
OPENERS = ["How does", "Why does", "When should", "In what way does", "Explain how", "Describe why"]


def _sentence(rng: random.Random) -> str:
    first = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    second = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    return f"{first[0].upper()}{first[1:]} {rng.choice(LINKS)} {second}."


def _text_of_tokens(rng: random.Random, tokenizer, n_tokens: int, head: str = "") -> str:
    """Text that the tokenizer reads as (about) n_tokens tokens: sentences, cut at a token edge."""
    text = head
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += (" " if text else "") + " ".join(_sentence(rng) for _ in range(4))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[n_tokens - 1][1]].strip()


def content_lengths(rows: int, seed: int, shape: Shape, max_content: int) -> list[int]:
    """Prompt+response tokens per row: log-normal around the shape's median, clipped to its range."""
    rng = random.Random(seed)
    most = min(shape.most, max_content)
    return [min(most, max(shape.least, round(rng.lognormvariate(math.log(shape.median), shape.sigma))))
            for _ in range(rows)]


def make_rows(tokenizer, rows: int, seed: int, shape: Shape, max_content: int) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for total in content_lengths(rows, seed, shape, max_content):
        question_tokens = max(5, round(total * rng.uniform(0.15, 0.5)))
        answer_tokens = max(5, total - question_tokens)
        subject = rng.choice(SUBJECTS)
        opening = f"{rng.choice(OPENERS)} {subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)}?"
        question = _text_of_tokens(rng, tokenizer, question_tokens, opening)
        answer_head = f"{subject[0].upper()}{subject[1:]} matters here."
        answer = _text_of_tokens(rng, tokenizer, answer_tokens, answer_head)
        out.append({"question": question, "answer": answer})
    return out


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The shared run description, and the work each step does.

def shape_of(spec: dict) -> Shape:
    """The spec's workload: one of SHAPES by name, or (bench/gpu_speed.py) spelled out."""
    return Shape(**spec["shape_spec"]) if "shape_spec" in spec else SHAPES[spec["shape"]]


def tunesmith_config(data_path: Path, out_dir: Path, total_steps: int, variant: Variant | None,
                     shape: Shape, model: str = MODEL) -> RunConfig:
    """The one RunConfig all tunesmith runs share; a variant changes only its own knobs."""
    train = {"learning_rate": LEARNING_RATE, "batch_size": shape.batch, "micro_batch_size": shape.batch,
             "max_steps": total_steps, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0,
             "grad_clip": 1.0, "eval_interval": 0, "save_interval": 0, "log_interval": 1,
             "precision": "auto", "device": "auto", "seed": SEED}
    if variant is not None:
        train.update(gradient_checkpointing=variant.gradient_checkpointing,
                     loss_chunk_size=variant.loss_chunk_size, compact_memory=variant.compact_memory,
                     compile=variant.compile, precision=variant.precision, attention=variant.attention,
                     loss_kernel=variant.loss_kernel)
    method = variant.method if variant is not None else "lora"
    return build({"model": model, "method": method, "out_dir": str(out_dir),
                  "data": {"path": str(data_path), "val_split": 0.0, "test_split": 0.0,
                           "max_seq_length": shape.max_length, "mask_prompt": True, "seed": SEED},
                  "train": train, "lora": {**LORA, "target_modules": "all-linear"}})


def step_plan(split: TokenizedSplit, total_steps: int, shape: Shape) -> StepPlan:
    return StepPlan.build(len(split), shape.batch, shape.batch, 1.0, total_steps, SEED)


def step_work(split: TokenizedSplit, indices: list[int]) -> dict:
    """Real tokens, supervised targets and example lengths of one step's examples."""
    lengths, targets = split.lengths, split.target_counts()
    return {"tokens": int(sum(int(lengths[i]) for i in indices)),
            "targets": int(sum(int(targets[i]) for i in indices)),
            "lengths": [int(lengths[i]) for i in indices]}


# ---------------------------------------------------------------------------------------------
# Child processes: one run each. They write a JSON result; the parent measures their memory.

def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    variant = Variant(**spec["variant"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runner = run_tunesmith if variant.tool == "tunesmith" else run_trl
    started = time.perf_counter()
    result = runner(variant, spec)
    result["child_seconds"] = time.perf_counter() - started
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _pad_each_step(split: TokenizedSplit, plan: StepPlan, pad_id: int) -> TokenizedSplit:
    """Every example padded (unsupervised pad tokens at its end) to the longest of its step: the
    compute of a right-padded batch, run through tunesmith's own loop; real positions are unchanged
    (causal attention never looks at the later pads), so the loss is the same."""
    lengths = split.lengths.tolist()
    target = [0] * len(split)
    for step in range(plan.total_steps):
        indices = plan.step_indices(step)
        longest = max(lengths[i] for i in indices)
        for i in indices:
            target[i] = max(target[i], longest)
    ids, supervised = [], []
    for i in range(len(split)):
        example_ids, example_supervised = split.example(i)
        pad = max(target[i], lengths[i]) - lengths[i]
        ids.append(example_ids.tolist() + [pad_id] * pad)
        supervised.append(example_supervised.tolist() + [False] * pad)
    return TokenizedSplit.from_lists(ids, supervised)


def _finetune_padded(config: RunConfig, shape: Shape) -> TokenizedSplit:
    """tunesmith's own finetune(), with the training split it prepares padded per step before the
    loop sees it (this child process only; the prepared files on disk stay unpadded)."""
    import tunesmith.finetune as finetune_module

    real_prepare, padded = finetune_module.prepare, {}

    def prepare_then_pad(config, tokenizer, *args, **kwargs):
        prepared = real_prepare(config, tokenizer, *args, **kwargs)
        train = prepared.splits["train"]
        padded["train"] = prepared.splits["train"] = _pad_each_step(
            train, step_plan(train, config.train.max_steps, shape), tokenizer.pad_token_id)
        return prepared

    finetune_module.prepare = prepare_then_pad
    try:
        finetune_module.finetune(config)
    finally:
        finetune_module.prepare = real_prepare
    return padded["train"]


def run_tunesmith(variant: Variant, spec: dict) -> dict:
    from tunesmith.finetune import finetune
    from tunesmith.train.metrics import read

    run_dir, shape = Path(spec["run_dir"]), shape_of(spec)
    config = tunesmith_config(Path(spec["data"]), run_dir, spec["total_steps"], variant, shape,
                              spec.get("model", MODEL))
    padded = _finetune_padded(config, shape) if variant.batching == "padded" else None
    if padded is None:
        finetune(config)
    real = TokenizedSplit.load(run_dir / "data" / "train")
    counted = real if padded is None else padded
    plan = step_plan(real, spec["total_steps"], shape)
    records = [r for r in read(run_dir / "metrics.jsonl") if "loss" in r]
    steps = []
    for record in records:
        indices = plan.step_indices(record["step"] - 1)
        # The loop logs tokens/s over each step (log_interval 1); tokens it counted / that rate is
        # the step's time. Padded runs count their pads there, so the counted split is used.
        seconds = step_work(counted, indices)["tokens"] / record["tokens_per_second"]
        steps.append({**step_work(real, indices), "loss": record["loss"], "seconds": seconds})
    return {"steps": steps, "dtype": str(pick_dtype(variant.precision, pick_device("auto"))).replace("torch.", "")}


class StepWork:
    """Wraps TRL's collator to record what each batch holds (batch k is step k's; accelerate may
    collate one batch ahead, but the order is kept)."""

    def __init__(self, collate):
        self.collate = collate
        self.steps: list[dict] = []

    def __call__(self, examples: list[dict]):
        tokens = targets = 0
        lengths = []
        for example in examples:
            labels = list(example["labels"])
            start = 0
            for length in example.get("seq_lengths") or [len(example["input_ids"])]:
                segment = labels[start: start + length]
                lengths.append(int(length))
                tokens += int(length)
                targets += sum(label != -100 for label in segment[1:])  # the first token has no predictor
                start += length
        self.steps.append({"tokens": tokens, "targets": targets, "lengths": lengths})
        return self.collate(examples)


def _trl_config(variant: Variant, spec: dict, dtype: torch.dtype, rows_per_step: int):
    from trl import SFTConfig

    max_length = shape_of(spec).max_length
    batching = {"padded": {"packing": False, "padding_free": False, "max_length": max_length},
                # the rows are already at most max_length (tunesmith truncated them); TRL refuses
                # padding_free without packing unless max_length is None
                "padding_free": {"packing": False, "padding_free": True, "max_length": None},
                "packing": {"packing": True, "packing_strategy": "bfd", "max_length": max_length}}
    return SFTConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=rows_per_step, gradient_accumulation_steps=1,
        num_train_epochs=1, max_steps=-1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", seed=SEED,
        bf16=dtype == torch.bfloat16, fp16=False, gradient_checkpointing=variant.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, completion_only_loss=True, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **batching[variant.batching])


def _trl_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            # With one micro batch per step and logging_steps=1 the logged loss is that step's
            # summed loss over its supervised tokens, divided by their count.
            if logs and "loss" in logs and "train_runtime" not in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return StepTimer()


def trl_model_options(variant: Variant, spec: dict, dtype: torch.dtype) -> dict:
    """Attention (FlashAttention 2 where bench/gpu_speed.py found it installed) and, for QLoRA, the
    4-bit quantization TRL's docs give: nf4, double quantization, computing in the run's dtype."""
    options = {"attn_implementation": spec.get("trl_attention", "sdpa")}
    if variant.method == "qlora":
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    return options


def trl_rows_per_step(variant: Variant, spec: dict) -> int:
    """The shape's batch; packing: rows of max length holding about the same tokens as that batch."""
    shape = shape_of(spec)
    if variant.batching != "packing":
        return shape.batch
    rows = json.loads(Path(spec["tokens"]).read_text())
    mean_length = statistics.mean(len(r["input_ids"]) for r in rows)
    return max(1, round(shape.batch * mean_length / shape.max_length))


def run_trl(variant: Variant, spec: dict) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = pick_dtype(variant.precision, pick_device("auto"))
    location = str(resolve(spec.get("model", MODEL)))
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **trl_model_options(variant, spec, dtype))
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM", bias="none")
    rows_per_step = trl_rows_per_step(variant, spec)
    return train_with_trl(variant, spec, model, tokenizer, lora, dtype, rows_per_step)


def train_with_trl(variant: Variant, spec: dict, model, tokenizer, lora, dtype: torch.dtype,
                   rows_per_step: int) -> dict:
    """TRL's SFTTrainer over the spec's token ids in their order; lora None: the model has its adapters."""
    import datasets
    from trl import SFTTrainer

    dataset = datasets.Dataset.from_list(json.loads(Path(spec["tokens"]).read_text()))

    class InOrder(SFTTrainer):
        """The dataset's own order (tunesmith's step plan), not a random permutation."""

        def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return torch.utils.data.SequentialSampler(dataset)

    trainer = InOrder(model=model, args=_trl_config(variant, spec, dtype, rows_per_step),
                      train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    work = StepWork(trainer.data_collator)
    trainer.data_collator = work
    timer = _trl_timer()
    trainer.add_callback(timer)
    trainer.train()
    steps = []
    for k, end in enumerate(timer.ends):
        seconds = end - timer.ends[k - 1] if k else float("nan")  # step 1's start is not marked
        steps.append({**work.steps[k], "loss": timer.losses.get(k + 1, float("nan")), "seconds": seconds})
    import trl

    return {"steps": steps, "dtype": str(dtype).replace("torch.", ""), "rows_per_step": rows_per_step,
            "trl_version": trl.__version__}


# ---------------------------------------------------------------------------------------------
# The parent: data, peaks, runs, table.

@dataclass
class Row:
    variant: Variant
    ok: bool
    error: str = ""
    wall_seconds: float = 0.0
    peak_bytes: int = 0
    memory_kind: str = "peak RSS"
    steps: list[dict] = field(default_factory=list)
    dtype: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def timed(self) -> list[dict]:
        return self.steps[1:]  # step 1 is the warm-up

    def total(self, key: str) -> float:
        return float(sum(s[key] for s in self.timed))

    def rate(self, key: str) -> float:
        return self.total(key) / max(self.total("seconds"), 1e-9)

    @property
    def final_loss(self) -> float:
        tail = [s["loss"] for s in self.steps[-min(TAIL_STEPS, max(1, len(self.steps) - 1)):]]
        return statistics.mean(tail) if tail else float("nan")


def run_child(variant: Variant, spec: dict, work_dir: Path, script: Path | None = None) -> Row:
    run_dir = work_dir / variant.name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "variant": variant.__dict__, "run_dir": str(run_dir),
            "result": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)
    command = [sys.executable, str(script or Path(__file__).resolve()), "--child", str(run_dir / "spec.json")]
    child = run_measured(command, run_dir / "child.log", HERE.parent, CHILD_TIMEOUT_SECONDS)
    row = Row(variant, ok=False, wall_seconds=child.wall_seconds, peak_bytes=child.peak_bytes)
    if child.returncode != 0 or not Path(spec["result"]).is_file():
        row.error = last_error(run_dir / "child.log", child.returncode)
        return row
    result = json.loads(Path(spec["result"]).read_text())
    row.ok, row.steps, row.dtype = True, result.pop("steps"), result.pop("dtype")
    if "cuda_peak_bytes" in result:
        row.peak_bytes, row.memory_kind = result.pop("cuda_peak_bytes"), "peak CUDA allocated"
    row.extra = result
    return row


def raise_peaks(peaks: dict[str, float], device: torch.device) -> None:
    """Measure the peaks again after a run and keep the higher: on a shared VM a whole one-second
    measurement can fall in a slow phase (here once 165 against 319 GFLOP/s minutes apart), and a
    low peak overstates every MFU computed against it."""
    for dtype, peak in measure_peaks(device).items():
        peaks[dtype] = max(peaks.get(dtype, 0.0), peak)


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Best-of-windows matmul peaks: fp32 always, bf16 where the hardware has it natively (elsewhere
    a bf16 matmul is emulated, hundreds of times slower, and would take minutes to measure)."""
    from tunesmith.train.flops import measure_peak_flops

    peaks = {"float32": measure_peak_flops(device, torch.float32)}
    if device.type == "cuda" or cpu_has_bf16():
        peaks["bfloat16"] = measure_peak_flops(device, torch.bfloat16)
    return peaks


def flop_model(config: RunConfig):
    """tunesmith's FlopModel of the LoRA-wrapped model: identical for every run (same model, same
    adapters), so it is built once here and applied to the work each run reports."""
    from tunesmith.model.adapters import prepare_for_training
    from tunesmith.model.load import load_model
    from tunesmith.train.flops import FlopModel

    model = prepare_for_training(load_model(resolve(config.model)), config, torch.float32)
    return FlopModel.of(model)


def prepare_data(args, work_dir: Path, total_steps: int, shape: Shape | None = None,
                 model: str = MODEL) -> tuple[Path, Path, dict]:
    """Write the JSONL every run reads, tokenize it with tunesmith, and write the token ids TRL
    gets, in the order of tunesmith's step plan."""
    from tunesmith.data.prepare import prepare
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(resolve(model), quiet=True)
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    empty_chat = tokenizer.apply_chat_template(empty, tokenize=False)
    overhead = len(tokenizer(empty_chat, add_special_tokens=False)["input_ids"])  # template tokens per row
    shape = shape or SHAPES[args.shape]
    data_path = work_dir / "train.jsonl"
    write_jsonl_atomic(data_path, make_rows(tokenizer, args.rows, args.seed, shape, shape.max_length - overhead - 8))
    prepared = prepare(tunesmith_config(data_path, work_dir / "prepared", total_steps, None, shape, model), tokenizer)
    split = prepared.splits["train"]
    plan = step_plan(split, total_steps, shape)
    order = [i for step in range(total_steps) for i in plan.step_indices(step)]
    tokens_path = work_dir / "trl_tokens.json"
    rows = []
    for i in order:
        ids, supervised = split.example(i)
        rows.append({"input_ids": ids.tolist(), "completion_mask": supervised.int().tolist()})
    tokens_path.write_text(json.dumps(rows))
    lengths = split.lengths.tolist()
    counts = prepared.manifest["counts"]["train"]
    facts = {"rows": len(split), "truncated": counts["truncated"], "template_overhead": overhead,
             "length": _spread(lengths), "content_length": _spread([n - overhead for n in lengths]),
             "supervised_share": counts["supervised_tokens"] / max(counts["tokens"], 1),
             "used_examples": len(order), "used_tokens": sum(lengths[i] for i in order)}
    return data_path, tokens_path, facts


def _spread(values: list[int]) -> dict:
    ordered = sorted(values)

    def at(share: float) -> int:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return {"min": ordered[0], "p50": at(0.5), "mean": round(statistics.mean(ordered), 1), "p90": at(0.9),
            "max": ordered[-1]}


# ---------------------------------------------------------------------------------------------
# Reporting.

def machine_lines(device: torch.device) -> list[str]:
    import peft
    import psutil
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cpu = cpu_model()
    memory = psutil.virtual_memory().total / 2**30
    bf16 = "native bf16" if cpu_has_bf16() else "no native bf16 (no avx512_bf16 / AMX)"
    threads = torch.get_num_threads()
    where = f"{cpu}, {os.cpu_count()} cores ({threads} torch threads), {memory:.0f} GiB RAM, {bf16}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA); host: {where}"
    software = (f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}, peft {peft.__version__}, trl {trl_version}")
    return [f"- Machine: {where}", f"- Software: {software}"]


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def row_mfu(row: Row, flops, peaks: dict[str, float]) -> float | None:
    """Useful FLOPs per second over the measured matmul peak of the row's dtype."""
    seconds = row.total("seconds")
    useful = sum(flops.step_flops(s["tokens"], s["targets"], s["lengths"]) for s in row.timed)
    peak = peaks.get(row.dtype)
    return useful / seconds / peak if peak and seconds > 0 else None


def table_lines(rows: list[Row], flops, peaks: dict[str, float]) -> list[str]:
    memory_kind = next((r.memory_kind for r in rows if r.ok), "peak RSS")
    lines = [(f"| run | settings | real tok/s | supervised tok/s | {memory_kind} (MiB) | final loss "
             f"| timed s (steps) | wall s | MFU |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        v = row.variant
        if not row.ok:
            error = row.error.replace("|", "/")
            wall = _fmt(row.wall_seconds)
            lines.append(f"| {v.name} | {v.settings} | failed: {error} | | | | | {wall} | |")
            continue
        seconds = row.total("seconds")
        share = row_mfu(row, flops, peaks)
        mfu = "n/a" if share is None else f"{100 * share:.1f}%"
        lines.append(f"| {v.name} | {v.settings} | {_fmt(row.rate('tokens'))} | {_fmt(row.rate('targets'))} "
                     f"| {_fmt(row.peak_bytes / 2**20)} | {_fmt(row.final_loss, 4)} | {_fmt(seconds, 1)} "
                     f"({len(row.timed)}) | {_fmt(row.wall_seconds)} | {mfu} |")
    return lines


def same_examples(a: Row, b: Row) -> bool:
    def shape(row: Row) -> list[tuple[int, int]]:
        return [(s["tokens"], s["targets"]) for s in row.steps]

    return a.ok and b.ok and shape(a) == shape(b)


def comparison_lines(rows: list[Row]) -> list[str]:
    ours = next((r for r in rows if r.variant.name == "tunesmith" and r.ok), None)
    theirs = [r for r in rows if r.variant.tool == "trl" and r.ok]
    if ours is None or not theirs:
        return ["- Ratios: need a successful `tunesmith` row and at least one TRL row."]
    fastest = max(theirs, key=lambda r: r.rate("tokens"))
    leanest = min(theirs, key=lambda r: r.peak_bytes)
    speed = ours.rate("tokens") / fastest.rate("tokens")
    memory = ours.peak_bytes / leanest.peak_bytes
    at_fastest = ours.peak_bytes / fastest.peak_bytes
    lines = [f"- Throughput: tunesmith / TRL's fastest ({fastest.variant.name}) = **{speed:.2f}x**",
             (f"- Memory: tunesmith / TRL at that fastest setting = **{at_fastest:.2f}x**; "
             f"/ TRL's leanest ({leanest.variant.name}) = **{memory:.2f}x**")]
    for other in theirs:
        if same_examples(ours, other):
            gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours.steps, other.steps, strict=True))
            how = f"same examples in every step; per-step losses differ by at most {gap:.4f}"
        else:
            how = "packing regroups the examples, so its steps are not the same batches"
        lines.append(f"- Loss: tunesmith {ours.final_loss:.4f} vs {other.variant.name} "
                     f"{other.final_loss:.4f} (difference {ours.final_loss - other.final_loss:+.4f}; {how})")
    return lines


def section_name(shape: Shape) -> str:
    return "train_speed" if shape.name == "mixed" else f"train_speed_{shape.name}"  # mixed: the original


def write_results(path: Path, name: str, section: list[str]) -> None:
    from results_md import write_section  # bench/ is on the path of a script run from it

    write_section(path, name, section)


def shape_summary(shape: Shape, rows: list[Row], flops, peaks: dict) -> dict | None:
    """The figures the summary table across shapes shows for one shape (None without both sides)."""
    ours = next((r for r in rows if r.variant.name == "tunesmith" and r.ok), None)
    theirs = [r for r in rows if r.variant.tool == "trl" and r.ok]
    if ours is None or not theirs:
        return None
    best = max(theirs, key=lambda r: r.rate("tokens"))
    return {"shape": shape.name, "about": shape.about, "tokens_per_second": ours.rate("tokens"),
            "peak_mib": ours.peak_bytes / 2**20, "dtype": ours.dtype, "mfu": row_mfu(ours, flops, peaks),
            "trl_best": best.variant.name, "trl_tokens_per_second": best.rate("tokens"),
            "trl_peak_mib": best.peak_bytes / 2**20, "trl_leanest_mib": min(r.peak_bytes for r in theirs) / 2**20,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def summary_lines(summaries: list[dict], peaks: dict, device: torch.device) -> list[str]:
    lines = ["## Training speed by workload shape: tunesmith vs TRL's best setting for each (bench/train_speed.py)",
             "", *machine_lines(device),
             "- Matmul peak (measure_peak_flops, best of several windows, before and after every run): "
             + ", ".join(f"{name} {value / 1e9:,.1f} GFLOP/s" for name, value in peaks.items()),
             f"- Command: `{_shown_python()} bench/train_speed.py --shape all` (each shape's table below)", "",
             ("| shape | tunesmith tok/s | TRL's best setting | its tok/s | speed ratio | memory: tunesmith / that "
             "setting | MFU (tunesmith) | measured |"),
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for s in summaries:
        mfu = "n/a" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
        lines.append(f"| {s['about']} | {s['tokens_per_second']:,.0f} | {s['trl_best']} | "
                     f"{s['trl_tokens_per_second']:,.0f} | **{s['tokens_per_second'] / s['trl_tokens_per_second']:.2f}x** "
                     f"| {s['peak_mib'] / s['trl_peak_mib']:.2f}x ({s['peak_mib']:,.0f} / {s['trl_peak_mib']:,.0f} MiB) "
                     f"| {mfu} ({s['dtype']}) | {s['date']} |")
    return lines


def report(args, rows: list[Row], flops, peaks: dict, facts: dict, device: torch.device) -> list[str]:
    shape = SHAPES[args.shape]
    length, content = facts["length"], facts["content_length"]
    dtype = next((r.dtype for r in rows if r.ok and r.variant.precision == "auto"),
                 str(pick_dtype("auto", device)).replace("torch.", ""))
    peak_line = ", ".join(f"{name} {value / 1e9:,.1f} GFLOP/s" for name, value in peaks.items())
    work = (f"SmolLM2-135M-Instruct, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout {LORA['dropout']} "
            f"on all linear layers, max length {shape.max_length}, {shape.batch} sequences per optimizer step, "
            f"AdamW lr {LEARNING_RATE} constant, grad clip 1.0, prompt masked, {dtype} (precision auto) unless "
            f"a row names another precision; {args.steps + 1} steps ({facts['used_examples']} examples, "
            f"{facts['used_tokens']:,} tokens); step 1 is a warm-up, not timed")
    data = (f"{facts['rows']} synthetic question/answer rows (seed {args.seed}, log-normal lengths, median "
            f"{shape.median}, clipped to {shape.least}-{min(shape.most, shape.max_length)}); prompt+response "
            f"{content['min']}-{content['max']} tokens (median "
            f"{content['p50']}, mean {content['mean']}, p90 {content['p90']}); with the chat template "
            f"{length['min']}-{length['max']} (mean {length['mean']}); "
            f"{100 * facts['supervised_share']:.0f}% of tokens supervised; {facts['truncated']} truncated")
    return [f"## Training, {shape.about}: tunesmith vs TRL SFTTrainer (bench/train_speed.py --shape {shape.name})",
            "",
            *machine_lines(device),
            f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- Command: `{' '.join([_shown_python(), *sys.argv])}`",
            f"- Work: {work}", f"- Data: {data}",
            f"- Matmul peak (measure_peak_flops, the highest of before and after every run): {peak_line}", "",
            *table_lines(rows, flops, peaks), "", *comparison_lines(rows), "", *notes(peaks, device)]


def _shown_python() -> str:
    python = Path(sys.executable)
    try:
        return str(python.relative_to(Path.cwd()))
    except ValueError:
        return str(python) if ".venv" in python.parts else python.name


NOTES = [
    ("- Timed: steps 2..N+1. TRL: wall time between the ends of step 1 and the last step (a TrainerCallback, "
    "which also records each step's loss). tunesmith: the sum of the per-step windows its loop logs in "
    "metrics.jsonl (log_interval 1). Both include building each batch and the optimizer step."),
    ("- Final loss: mean over the last 3 steps of each step's loss per supervised token (TRL's logged `loss` "
    "with one micro batch per step and logging_steps=1 is exactly that; tunesmith logs the same)."),
    ("- Real tokens exclude padding. TRL's padded batches compute their pads, and on CPU its fused loss head "
    "scores every position (prompt and padding too); tunesmith computes logits only at supervised "
    "positions. MFU counts useful FLOPs only (tunesmith's FlopModel), the same way for every row."),
    ("- tunesmith-padded emulates padded batches inside tunesmith's loop: each example is padded to its "
    "step's longest with unsupervised pad tokens, so its loss equals the packed run's."),
    ("- TRL gets tunesmith's token ids and completion masks (a pre-tokenized dataset) in tunesmith's step "
    "order with a sequential sampler; the LoRA initialisation differs (each tool seeds its own)."),
    ("- TRL padding_free without packing needs max_length=None (the rows are already at most the max length); "
    "with SDPA transformers turns the restarting position_ids into a block-diagonal mask. trl-packing packs "
    "whole examples (bfd) into rows of the max length, about as many tokens per step as the shape's batch."),
    ("- bf16 rows keep the frozen weights in bf16 and run the maths in bf16 (tunesmith: autocast; TRL: "
    "bf16=True); the LoRA weights and their optimizer state stay fp32."),
]


def notes(peaks: dict, device: torch.device) -> list[str]:
    lines = ["Notes:", *NOTES]
    if device.type == "cpu" and "bfloat16" in peaks:
        ratio = peaks["float32"] / peaks["bfloat16"]
        native = "has native bf16 (avx512_bf16" + (" / AMX)" if "amx" in cpu_flags() else ", no AMX)")
        pick = str(pick_dtype("auto", device)).replace("torch.", "")
        speed = f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"
        lines.append(f"- This CPU {native if cpu_has_bf16() else 'has no native bf16'}: a bf16 matmul runs "
                     f"{speed} than fp32 here (the peaks above), so precision auto trains in {pick}.")
    elif device.type == "cpu":
        lines.append("- No bf16 rows: this CPU has no native bf16 (no avx512_bf16 / AMX), where a bf16 matmul runs "
                     "hundreds of times slower than fp32; precision auto trains in fp32.")
    return lines


def cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all",
                        help="workload: " + "; ".join(f"{s.name}: {s.about}, {s.batch} per step, max length "
                                                      f"{s.max_length}" for s in SHAPES.values()))
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps, after one warm-up step (default per shape: "
                             + ", ".join(f"{s.name} {s.steps}" for s in SHAPES.values()) + ")")
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default: batch x (steps + 1))")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the synthetic data")
    parser.add_argument("--runs", default="core", help="comma-separated run names, core (default: every TRL "
                        "setting, tunesmith with and without checkpointing, and a pair in the precision auto does not "
                        "pick: bf16 where the CPU has native bf16, fp32 where auto picks bf16) or all: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "train_speed")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown file to update")
    parser.add_argument("--no-results", action="store_true", help="print the table only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def chosen_variants(runs: str, device: torch.device) -> list[Variant]:
    by_name = {v.name: v for v in VARIANTS}  # in the order given, so a re-check can run them reversed
    if runs in ("core", "all"):
        return [v for v in VARIANTS if (runs == "all" or v.core) and _other_precision_worth_a_row(v, device)]
    unknown = [n for n in runs.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(by_name)}")
    return [by_name[n] for n in runs.split(",")]


def _other_precision_worth_a_row(variant: Variant, device: torch.device) -> bool:
    """A row in an explicit precision is shown where it is not the one auto picks (it would repeat a
    row) and, for bf16, only where the hardware has it (an emulated bf16 matmul is hundreds of times
    slower and would take minutes to measure)."""
    if variant.precision == "auto":
        return True
    if {"bf16": torch.bfloat16, "fp32": torch.float32}[variant.precision] == pick_dtype("auto", device):
        return False
    return variant.precision != "bf16" or device.type == "cuda" or cpu_has_bf16()


def run_shape(args, shape: Shape, wanted: list[Variant], peaks: dict, device: torch.device) -> dict | None:
    """One shape: its data, every chosen run, its section of RESULTS.md; returns its summary."""
    args = argparse.Namespace(**{**vars(args), "shape": shape.name})
    args.steps = args.steps or shape.steps
    args.rows = args.rows or shape.batch * (args.steps + 1)
    if args.rows < shape.batch:
        raise SystemExit(f"--rows must be at least {shape.batch} for the {shape.name} shape")
    total_steps = args.steps + 1
    work_dir = args.work_dir / shape.name
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{shape.name}] preparing {args.rows} rows ...", file=sys.stderr)
    data_path, tokens_path, facts = prepare_data(args, work_dir, total_steps)
    flops = flop_model(tunesmith_config(data_path, work_dir / "prepared", total_steps, None, shape))
    spec = {"data": str(data_path), "tokens": str(tokens_path), "total_steps": total_steps, "shape": shape.name}
    rows = []
    for variant in wanted:
        print(f"[{shape.name}] running {variant.name} ...", file=sys.stderr, flush=True)
        row = run_child(variant, spec, work_dir)
        print(f"  {'ok' if row.ok else row.error}  ({row.wall_seconds:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
        raise_peaks(peaks, device)
    lines = report(args, rows, flops, peaks, facts, device)
    print("\n".join(lines))
    summary = shape_summary(shape, rows, flops, peaks)
    if not args.no_results:
        write_results(args.results, section_name(shape), lines)
        if summary is not None:
            (work_dir / "summary.json").write_text(json.dumps(summary))
    return summary if all(r.ok for r in rows) else None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    device = pick_device("auto")
    wanted = chosen_variants(args.runs, device)
    print("Measuring the matmul peak ...", file=sys.stderr)
    peaks = measure_peaks(device)
    shapes = list(SHAPES.values()) if args.shape == "all" else [SHAPES[args.shape]]
    results = [run_shape(args, shape, wanted, peaks, device) for shape in shapes]
    if not args.no_results:  # the summary shows every shape measured so far, the others from earlier runs
        summaries = []
        for shape in SHAPES.values():
            saved = args.work_dir / shape.name / "summary.json"
            if saved.is_file():
                summaries.append(json.loads(saved.read_text()))
        if summaries:
            write_results(args.results, "train_speed_summary", summary_lines(summaries, peaks, device))
        print(f"\nWrote {args.results}", file=sys.stderr)
    return 0 if all(r is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
