"""Training speed and memory, side by side: tunesmith against TRL's SFTTrainer (+ PEFT).

    .venv/bin/python bench/train_speed.py [--steps N] [--rows N] [--runs a,b,...]

Everyone does the same work: SmolLM2-135M-Instruct (the embedded model, no hub access), LoRA
r=16 alpha=32 dropout 0 on every linear layer, max length 512, 8 sequences per optimizer step,
AdamW at a constant 2e-4 with gradient clipping at 1.0, the prompt masked (completions only),
bf16 where the hardware multiplies it natively and fp32 elsewhere. The data is one synthetic
instruction set (question/answer JSONL) with prompt+response lengths spread like real data.

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
supervised positions) over a dense-matmul peak this script measures with measure_peak_flops.
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
BATCH_SIZE = 8  # sequences per optimizer step, for everyone
MAX_LENGTH = 512
LEARNING_RATE = 2e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
TAIL_STEPS = 3  # final loss = mean of the last this-many step losses
CHILD_TIMEOUT_SECONDS = 4 * 3600
RESULTS_BEGIN, RESULTS_END = "<!-- train_speed:begin -->", "<!-- train_speed:end -->"


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


VARIANTS = [
    Variant("tunesmith", "tunesmith", "defaults: packed rows, chunked loss, no checkpointing"),
    Variant("tunesmith-gc", "tunesmith", "+ gradient checkpointing", gradient_checkpointing=True),
    Variant("tunesmith-compact", "tunesmith", "+ train.compact_memory (freed memory back to the OS at once)",
            compact_memory=True),
    Variant("tunesmith-compile", "tunesmith", "+ train.compile (torch.compile of each layer; compile time not timed)",
            compile=True),
    Variant("tunesmith-padded", "tunesmith", "padded batches (emulated), no checkpointing",
            batching="padded"),
    Variant("tunesmith-one-chunk", "tunesmith", "loss in one chunk (not chunked), no checkpointing",
            loss_chunk_size=10**9),
    Variant("trl-padded-gc", "trl", "padded batches, gradient checkpointing (TRL's default)",
            gradient_checkpointing=True, batching="padded"),
    Variant("trl-padded", "trl", "padded batches, no checkpointing", batching="padded"),
    Variant("trl-padding-free", "trl", "padding_free, no checkpointing", batching="padding_free"),
    Variant("trl-padding-free-gc", "trl", "padding_free, gradient checkpointing",
            gradient_checkpointing=True, batching="padding_free"),
    Variant("trl-packing", "trl", "packing (bfd, rows of 512), no checkpointing", batching="packing"),
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


def content_lengths(rows: int, seed: int, median: int, max_content: int) -> list[int]:
    """Prompt+response tokens per row: log-normal (most short, a long tail), clipped to [20, max]."""
    rng = random.Random(seed)
    return [min(max_content, max(20, round(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(rows)]


def make_rows(tokenizer, rows: int, seed: int, median: int, max_content: int) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for total in content_lengths(rows, seed, median, max_content):
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

def tunesmith_config(data_path: Path, out_dir: Path, total_steps: int, variant: Variant | None) -> RunConfig:
    """The one RunConfig all tunesmith runs share; a variant changes only its own knobs."""
    train = {"learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE, "micro_batch_size": BATCH_SIZE,
             "max_steps": total_steps, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0,
             "grad_clip": 1.0, "eval_interval": 0, "save_interval": 0, "log_interval": 1,
             "precision": "auto", "device": "auto", "seed": SEED}
    if variant is not None:
        train.update(gradient_checkpointing=variant.gradient_checkpointing,
                     loss_chunk_size=variant.loss_chunk_size, compact_memory=variant.compact_memory,
                     compile=variant.compile)
    return build({"model": MODEL, "method": "lora", "out_dir": str(out_dir),
                  "data": {"path": str(data_path), "val_split": 0.0, "test_split": 0.0,
                           "max_seq_length": MAX_LENGTH, "mask_prompt": True, "seed": SEED},
                  "train": train, "lora": {**LORA, "target_modules": "all-linear"}})


def step_plan(split: TokenizedSplit, total_steps: int) -> StepPlan:
    return StepPlan.build(len(split), BATCH_SIZE, BATCH_SIZE, 1.0, total_steps, SEED)


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


def _finetune_padded(config: RunConfig) -> TokenizedSplit:
    """tunesmith's own finetune(), with the training split it prepares padded per step before the
    loop sees it (this child process only; the prepared files on disk stay unpadded)."""
    import tunesmith.finetune as finetune_module

    real_prepare, padded = finetune_module.prepare, {}

    def prepare_then_pad(config, tokenizer, *args, **kwargs):
        prepared = real_prepare(config, tokenizer, *args, **kwargs)
        train = prepared.splits["train"]
        padded["train"] = prepared.splits["train"] = _pad_each_step(
            train, step_plan(train, config.train.max_steps), tokenizer.pad_token_id)
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

    run_dir = Path(spec["run_dir"])
    config = tunesmith_config(Path(spec["data"]), run_dir, spec["total_steps"], variant)
    padded = _finetune_padded(config) if variant.batching == "padded" else None
    if padded is None:
        finetune(config)
    real = TokenizedSplit.load(run_dir / "data" / "train")
    counted = real if padded is None else padded
    plan = step_plan(real, spec["total_steps"])
    records = [r for r in read(run_dir / "metrics.jsonl") if "loss" in r]
    steps = []
    for record in records:
        indices = plan.step_indices(record["step"] - 1)
        # The loop logs tokens/s over each step (log_interval 1); tokens it counted / that rate is
        # the step's time. Padded runs count their pads there, so the counted split is used.
        seconds = step_work(counted, indices)["tokens"] / record["tokens_per_second"]
        steps.append({**step_work(real, indices), "loss": record["loss"], "seconds": seconds})
    return {"steps": steps, "dtype": str(pick_dtype("auto", pick_device("auto"))).replace("torch.", "")}


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

    batching = {"padded": {"packing": False, "padding_free": False, "max_length": MAX_LENGTH},
                # the rows are already at most MAX_LENGTH (tunesmith truncated them); TRL refuses
                # padding_free without packing unless max_length is None
                "padding_free": {"packing": False, "padding_free": True, "max_length": None},
                "packing": {"packing": True, "packing_strategy": "bfd", "max_length": MAX_LENGTH}}
    return SFTConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=rows_per_step, gradient_accumulation_steps=1,
        num_train_epochs=1, max_steps=-1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", seed=SEED,
        bf16=dtype == torch.bfloat16, fp16=False, gradient_checkpointing=variant.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, completion_only_loss=True, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
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


def run_trl(variant: Variant, spec: dict) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    location = str(resolve(MODEL))
    rows = json.loads(Path(spec["tokens"]).read_text())
    dataset = datasets.Dataset.from_list(rows)
    rows_per_step = BATCH_SIZE
    if variant.batching == "packing":  # about the same tokens per step as 8 unpacked examples
        mean_length = statistics.mean(len(r["input_ids"]) for r in rows)
        rows_per_step = max(1, round(BATCH_SIZE * mean_length / MAX_LENGTH))
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM", bias="none")
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


def run_child(variant: Variant, spec: dict, work_dir: Path) -> Row:
    run_dir = work_dir / variant.name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "variant": variant.__dict__, "run_dir": str(run_dir),
            "result": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir / "spec.json")]
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


def measure_peaks(device: torch.device, skip_bf16: bool) -> dict[str, float]:
    from tunesmith.train.flops import measure_peak_flops

    peaks = {"float32": measure_peak_flops(device, torch.float32)}
    if not skip_bf16:
        peaks["bfloat16"] = measure_peak_flops(device, torch.bfloat16)
    return peaks


def flop_model(config: RunConfig):
    """tunesmith's FlopModel of the LoRA-wrapped model: identical for every run (same model, same
    adapters), so it is built once here and applied to the work each run reports."""
    from tunesmith.model.adapters import prepare_for_training
    from tunesmith.model.load import load_model
    from tunesmith.train.flops import FlopModel

    model = prepare_for_training(load_model(resolve(MODEL)), config, torch.float32)
    return FlopModel.of(model)


def prepare_data(args, work_dir: Path, total_steps: int) -> tuple[Path, Path, dict]:
    """Write the JSONL every run reads, tokenize it with tunesmith, and write the token ids TRL
    gets, in the order of tunesmith's step plan."""
    from tunesmith.data.prepare import prepare
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(resolve(MODEL), quiet=True)
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    empty_chat = tokenizer.apply_chat_template(empty, tokenize=False)
    overhead = len(tokenizer(empty_chat, add_special_tokens=False)["input_ids"])  # template tokens per row
    data_path = work_dir / "train.jsonl"
    write_jsonl_atomic(data_path, make_rows(tokenizer, args.rows, args.seed, args.median_tokens,
                                             MAX_LENGTH - overhead - 8))
    prepared = prepare(tunesmith_config(data_path, work_dir / "prepared", total_steps, None), tokenizer)
    split = prepared.splits["train"]
    plan = step_plan(split, total_steps)
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
        useful = sum(flops.step_flops(s["tokens"], s["targets"], s["lengths"]) for s in row.timed)
        peak = peaks.get(row.dtype)
        mfu = f"{100 * useful / seconds / peak:.1f}%" if peak and seconds > 0 else "n/a"
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
             f"- Memory: tunesmith / TRL at that fastest setting = **{at_fastest:.2f}x**; "
             f"/ TRL's leanest ({leanest.variant.name}) = **{memory:.2f}x**"]
    for other in theirs:
        if same_examples(ours, other):
            gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours.steps, other.steps, strict=True))
            how = f"same examples in every step; per-step losses differ by at most {gap:.4f}"
        else:
            how = "packing regroups the examples, so its steps are not the same batches"
        lines.append(f"- Loss: tunesmith {ours.final_loss:.4f} vs {other.variant.name} "
                     f"{other.final_loss:.4f} (difference {ours.final_loss - other.final_loss:+.4f}; {how})")
    return lines


def write_results(path: Path, section: list[str]) -> None:
    from results_md import write_section  # bench/ is on the path of a script run from it

    write_section(path, "train_speed", section)


def report(args, rows: list[Row], flops, peaks: dict, facts: dict, device: torch.device) -> list[str]:
    length, content = facts["length"], facts["content_length"]
    dtype = next((r.dtype for r in rows if r.ok), str(pick_dtype("auto", device)).replace("torch.", ""))
    peak_line = ", ".join(f"{name} {value / 1e9:,.1f} GFLOP/s" for name, value in peaks.items())
    work = (f"SmolLM2-135M-Instruct, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout {LORA['dropout']} "
            f"on all linear layers, max length {MAX_LENGTH}, {BATCH_SIZE} sequences per optimizer step, "
            f"AdamW lr {LEARNING_RATE} constant, grad clip 1.0, prompt masked, {dtype}; "
            f"{args.steps + 1} steps ({facts['used_examples']} examples, {facts['used_tokens']:,} tokens); "
            "step 1 is a warm-up, not timed")
    data = (f"{facts['rows']} synthetic question/answer rows (seed {args.seed}, log-normal lengths, median "
            f"{args.median_tokens}); prompt+response {content['min']}-{content['max']} tokens (median "
            f"{content['p50']}, mean {content['mean']}, p90 {content['p90']}); with the chat template "
            f"{length['min']}-{length['max']} (mean {length['mean']}); "
            f"{100 * facts['supervised_share']:.0f}% of tokens supervised; {facts['truncated']} truncated")
    return ["## Training: tunesmith vs TRL SFTTrainer (bench/train_speed.py)", "",
            *machine_lines(device),
            f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- Command: `{' '.join([_shown_python(), *sys.argv])}`",
            f"- Work: {work}", f"- Data: {data}", f"- Matmul peak (measure_peak_flops): {peak_line}", "",
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
    ("- TRL padding_free without packing needs max_length=None (the rows are already at most 512); with SDPA "
    "transformers turns the restarting position_ids into a block-diagonal mask. trl-packing packs whole "
    "examples (bfd) into rows of 512, about as many tokens per step as 8 examples."),
]


def notes(peaks: dict, device: torch.device) -> list[str]:
    lines = ["Notes:", *NOTES]
    if "bfloat16" in peaks and device.type == "cpu" and not cpu_has_bf16():
        ratio = peaks["float32"] / peaks["bfloat16"]
        lines.append(f"- bf16 frozen weights cannot pay on this CPU: without avx512_bf16 / AMX a bf16 matmul "
                     f"runs {ratio:,.0f}x slower than fp32 here, so precision auto trains in fp32 and "
                     "no bf16 row is run.")
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4,
                        help="timed optimizer steps, after one warm-up step (4: about 20 minutes on 2 cores)")
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default: 8 x (steps + 1))")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the synthetic data")
    parser.add_argument("--median-tokens", type=int, default=80,
                        help="median prompt+response tokens of a synthetic row (log-normal spread)")
    parser.add_argument("--runs", default="all", help="comma-separated run names (default: all): "
                        + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "train_speed")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown file to update")
    parser.add_argument("--no-results", action="store_true", help="print the table only")
    parser.add_argument("--skip-bf16-peak", action="store_true",
                        help="skip the bf16 matmul peak (about a minute on a CPU without native bf16)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    args.rows = args.rows or BATCH_SIZE * (args.steps + 1)
    if args.rows < BATCH_SIZE:
        parser.error(f"--rows must be at least {BATCH_SIZE}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    by_name = {v.name: v for v in VARIANTS}  # in the order given, so a re-check can run them reversed
    wanted = VARIANTS if args.runs == "all" else [by_name[n] for n in args.runs.split(",") if n in by_name]
    unknown = set(args.runs.split(",")) - {v.name for v in VARIANTS} - {"all"}
    if unknown or not wanted:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}")
    total_steps = args.steps + 1
    args.work_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    print(f"Preparing {args.rows} rows and the model ...", file=sys.stderr)
    data_path, tokens_path, facts = prepare_data(args, args.work_dir, total_steps)
    flops = flop_model(tunesmith_config(data_path, args.work_dir / "prepared", total_steps, None))
    print("Measuring the matmul peak ...", file=sys.stderr)
    peaks = measure_peaks(device, args.skip_bf16_peak)
    spec = {"data": str(data_path), "tokens": str(tokens_path), "total_steps": total_steps}
    rows = []
    for variant in wanted:
        print(f"Running {variant.name} ...", file=sys.stderr, flush=True)
        row = run_child(variant, spec, args.work_dir)
        print(f"  {'ok' if row.ok else row.error}  ({row.wall_seconds:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    lines = report(args, rows, flops, peaks, facts, device)
    print("\n".join(lines))
    if not args.no_results:
        write_results(args.results, lines)
        print(f"\nWrote {args.results}", file=sys.stderr)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
