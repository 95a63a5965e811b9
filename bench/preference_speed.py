"""Preference tuning speed and memory, side by side: tunesmith DPO against TRL's DPOTrainer (+ PEFT).

    .venv/bin/python bench/preference_speed.py [--steps N] [--runs a,b,...] [--write]
    .venv/bin/python bench/preference_speed.py --quick      # tiny shapes, 3 steps: the script end to end

Runs (default: tunesmith and the four TRL ones): tunesmith; trl (padded batches, the reference
forward in every step); trl-precompute (precompute_ref_log_probs); trl-grouped (transformers'
LengthGroupedSampler: pairs of similar length share a step, less padding); trl-grouped-precompute;
on request trl-padding-free (TRL 1.16 falls back to padding for DPO), trl-gc and tunesmith-gc.

Everyone does the same work: SmolLM2-135M-Instruct (the embedded model: tunesmith's alias resolves
to a cached Hugging Face folder and TRL loads that very folder; no hub access), DPO with the
sigmoid loss and beta 0.1, the reference being the model with its adapter switched off, LoRA r=16
alpha=32 dropout 0.05 on every linear layer, 8 pairs (16 sequences) per optimizer step with no
accumulation, max length 512, AdamW at a constant 2e-4 with gradient clipping at 1.0, in one
precision for both (`--precision`, default what tunesmith's `auto` picks on this machine: bf16
where the CPU multiplies it natively, else fp32).

The data is real text from a Debian package already on the machine: the docstrings of Python's
standard library as Debian's libpython3.X-stdlib installs it (/usr/lib/python3.X; where that is
missing, the running interpreter's own standard library, which the table then names). A pair is
    prompt    What does `json.dumps` do in the Python standard library?
    chosen    the docstring of json.dumps (its first paragraphs, up to about 600 characters)
    rejected  the docstring of another function of the same module (a real, wrong answer)
read from the source files with `ast` (nothing is imported or executed), picked with a seed.

tunesmith tokenizes the pairs with its own `prepare` (the model's chat template); TRL receives
exactly those token ids (prompt, chosen and rejected ids, its own tokenization step skipped) in
the order tunesmith's seeded step plan visits the pairs, with a sequential sampler, so both train
on the same pairs in the same steps and process the same tokens (the grouped runs: the same pairs
and tokens overall, other pairs in each step).

Each run is its own process, one at a time, so its peak memory (the kernel's peak RSS of that
process, from wait4) is its own. Step 1 is a warm-up and is not timed; the timed part is steps
2..N+1: for TRL the time between the ends of step 1 and step N+1 (a trainer callback), for
tunesmith the sum of the per-step windows its loop logs in metrics.jsonl. Both include building
each step's batch, the reference forward, the policy forward and backward and the optimizer
step. Model loading and data preparation are outside the timed part but inside the wall time.
TRL's precompute_ref_log_probs moves the reference forward before the first step: that pass is
timed on its own and shown both apart and folded into the rate.

Tokens are counted the same way for both: the real (unpadded) tokens of every chosen and every
rejected sequence, prompt included, each counted once per step (the reference pass over the same
sequences is not counted again). Final loss and reward accuracy are the means over the last 5
steps of what each tool logs per step (accuracy: the share of the step's pairs whose implicit
reward beta*(logp - ref_logp) is higher for the chosen answer).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from processes import last_error, run_measured  # bench/ is on the path of a script run from it

from tunesmith.config import RunConfig, build
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.device import pick_device, pick_dtype
from tunesmith.model.load import resolve
from tunesmith.train.batching import StepPlan

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
SEED = 42
LEARNING_RATE = 2e-4
BETA = 0.1
TAIL_STEPS = 5  # final loss and accuracy = mean of the last this-many steps
CHILD_TIMEOUT_SECONDS = 3 * 3600


@dataclass(frozen=True)
class Shapes:
    """The work of one bench run; --quick shrinks it to check the script end to end."""

    pairs_per_step: int = 8
    max_length: int = 512
    answer_chars: int = 600  # docstring text kept per answer (whole paragraphs, at least the first)
    steps: int = 24  # timed steps, after one warm-up step


QUICK = Shapes(pairs_per_step=2, max_length=128, answer_chars=160, steps=2)


@dataclass(frozen=True)
class Variant:
    name: str
    tool: str  # tunesmith | trl
    settings: str  # what a reader sees in the table
    gradient_checkpointing: bool = False
    precompute_reference: bool = False  # trl only: precompute_ref_log_probs
    padding_free: bool = False  # trl only
    group_by_length: bool = False  # trl only: batches of similar lengths (less padding, other pairs per step)


VARIANTS = [
    Variant("tunesmith", "tunesmith", "defaults: packed rows, chunked log-probs, reference = adapter off"),
    Variant("trl", "trl", "padded batches, reference forward every step, no checkpointing"),
    Variant("trl-precompute", "trl", "precompute_ref_log_probs (reference pass before step 1), "
            "no checkpointing", precompute_reference=True),
    Variant("trl-grouped", "trl", "batches grouped by length (transformers' LengthGroupedSampler), "
            "no checkpointing", group_by_length=True),
    Variant("trl-grouped-precompute", "trl", "grouped by length + precompute_ref_log_probs, no checkpointing",
            group_by_length=True, precompute_reference=True),
    Variant("trl-padding-free", "trl", "padding_free=True (1.16 warns and falls back to padding)",
            padding_free=True),
    Variant("trl-gc", "trl", "padded, gradient checkpointing (TRL's default)", gradient_checkpointing=True),
    Variant("tunesmith-gc", "tunesmith", "+ gradient checkpointing", gradient_checkpointing=True),
]
DEFAULT_RUNS = "tunesmith,trl,trl-precompute,trl-grouped,trl-grouped-precompute"


# ---------------------------------------------------------------------------------------------
# The data: docstrings of the standard library as a Debian package installs it.

SKIPPED_FOLDERS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                   "dist-packages", "__pycache__", "pydoc_data"}


def stdlib_folder() -> tuple[Path, str]:
    """Debian's /usr/lib/python3.X (this interpreter's version first), else the interpreter's own."""
    wanted = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    found = [wanted] + sorted(Path("/usr/lib").glob("python3.*"), reverse=True)
    for folder in found:
        if (folder / "os.py").is_file():
            return folder, f"Debian's libpython{folder.name[len('python'):]}-stdlib ({folder})"
    own = Path(sysconfig.get_paths()["stdlib"])
    return own, f"the running interpreter's standard library ({own}; no Debian python3 found)"


def answer_text(docstring: str, budget_chars: int) -> str:
    """The first paragraphs within the budget: always the whole first one, none from examples on."""
    kept: list[str] = []
    for paragraph in docstring.split("\n\n"):
        over = kept and sum(map(len, kept)) + len(paragraph) > budget_chars
        if over or paragraph.lstrip().startswith(">>>"):
            break
        kept.append(paragraph.strip())
    return "\n\n".join(kept)


def documented_functions(folder: Path) -> list[tuple[str, str, str]]:
    """(module, qualified name, docstring) of every public function and method with a docstring."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if set(parts) & SKIPPED_FOLDERS or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            members = [(node.name, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                members = [(f"{node.name}.{m.name}", m) for m in node.body
                           if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for name, function in members:
                docstring = ast.get_docstring(function)
                if docstring and not any(part.startswith("_") for part in name.split(".")):
                    out.append((module, f"{module}.{name}", docstring))
    return out


def make_pairs(n_pairs: int, seed: int, answer_chars: int) -> tuple[list[dict], str]:
    """n_pairs prompt/chosen/rejected rows: a function's docstring against a sibling's (same module)."""
    folder, source = stdlib_folder()
    usable = []
    for module, name, docstring in documented_functions(folder):
        answer = answer_text(docstring, answer_chars)
        if len(answer.split()) >= 6 and "deprecated" not in answer.lower():
            usable.append((module, name, answer))
    by_module: dict[str, list[tuple[str, str]]] = {}
    for module, name, answer in usable:
        by_module.setdefault(module, []).append((name, answer))
    rng = random.Random(seed)
    candidates = [u for u in usable if len({a for _, a in by_module[u[0]]}) > 1]
    rows = []
    for module, name, answer in rng.sample(candidates, n_pairs):
        others = sorted({a for n, a in by_module[module] if a != answer})
        rows.append({"prompt": f"What does `{name}` do in the Python standard library?", "chosen": answer,
                     "rejected": rng.choice(others), "source": name})
    counts = f"{len(usable):,} documented public functions and methods in {len(by_module)} modules"
    return rows, f"{source}: {counts}"


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The shared run description.

def tunesmith_config(data_path: Path, out_dir: Path, shapes: Shapes, precision: str, dropout: float,
                     variant: Variant | None = None) -> RunConfig:
    """The one RunConfig every tunesmith run shares; a variant changes only its own knobs."""
    train = {"learning_rate": LEARNING_RATE, "batch_size": shapes.pairs_per_step,
             "micro_batch_size": shapes.pairs_per_step, "max_steps": shapes.steps + 1, "warmup_steps": 0,
             "lr_schedule": "constant", "weight_decay": 0.0, "grad_clip": 1.0, "eval_interval": 0,
             "save_interval": 0, "log_interval": 1, "precision": precision, "device": "auto", "seed": SEED,
             "gradient_checkpointing": bool(variant and variant.gradient_checkpointing)}
    return build({"model": MODEL, "method": "dpo", "out_dir": str(out_dir),
                  "data": {"path": str(data_path), "val_split": 0.0, "test_split": 0.0,
                           "max_seq_length": shapes.max_length, "seed": SEED},
                  "train": train,
                  "lora": {"r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"},
                  "preference": {"weights": "lora", "beta": BETA, "loss_type": "sigmoid"}})


def step_plan(split: TokenizedSplit, shapes: Shapes) -> StepPlan:
    pairs = len(split) // 2  # sequences 2i (chosen) and 2i+1 (rejected) are pair i
    return StepPlan.build(pairs, shapes.pairs_per_step, shapes.pairs_per_step, 1.0, shapes.steps + 1, SEED)


def pair_tokens(split: TokenizedSplit, pairs: list[int]) -> int:
    """Real tokens of the chosen and rejected sequences of these pairs, prompts included."""
    lengths = split.lengths
    return int(sum(int(lengths[2 * p]) + int(lengths[2 * p + 1]) for p in pairs))


# ---------------------------------------------------------------------------------------------
# Child processes: one run each. They write a JSON result; the parent measures their memory.

def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    variant = Variant(**spec["variant"])
    runner = run_tunesmith if variant.tool == "tunesmith" else run_trl
    started = time.perf_counter()
    result = runner(variant, spec)
    result["child_seconds"] = time.perf_counter() - started
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_tunesmith(variant: Variant, spec: dict) -> dict:
    from tunesmith.finetune import finetune
    from tunesmith.train.metrics import read

    shapes, run_dir = Shapes(**spec["shapes"]), Path(spec["run_dir"])
    data_path = Path(spec["data"])
    config = tunesmith_config(data_path, run_dir, shapes, spec["precision"], spec["dropout"], variant)
    finetune(config)
    split = TokenizedSplit.load(run_dir / "data" / "train")
    plan = step_plan(split, shapes)
    steps = []
    for record in (r for r in read(run_dir / "metrics.jsonl") if "loss" in r):
        tokens = pair_tokens(split, plan.step_indices(record["step"] - 1))
        # log_interval 1: the loop's tokens/s covers exactly this step, so tokens / rate is its time
        steps.append({"tokens": tokens, "seconds": tokens / record["tokens_per_second"],
                      "loss": record["loss"], "accuracy": record["reward_accuracy"]})
    return {"steps": steps}


class CountingCollator:
    """Wraps TRL's collator to record the real tokens of each batch (its attention mask's ones)."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens: list[int] = []

    def __call__(self, examples: list[dict]):
        batch = self.collate(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def _trl_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.logs: dict[int, dict] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            # One batch per step and logging_steps=1: the logged loss and accuracy are that step's.
            if logs and "loss" in logs and "train_runtime" not in logs:
                self.logs[state.global_step] = {"loss": float(logs["loss"]),
                                                "accuracy": float(logs.get("rewards/accuracies", math.nan))}

    return StepTimer()


def _trl_config(variant: Variant, spec: dict, dtype: torch.dtype):
    from trl import DPOConfig

    shapes = Shapes(**spec["shapes"])
    return DPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=shapes.pairs_per_step,
        gradient_accumulation_steps=1, num_train_epochs=1, max_steps=shapes.steps + 1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", seed=SEED,
        bf16=dtype == torch.bfloat16, fp16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=variant.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, beta=BETA, loss_type=["sigmoid"],
        max_length=shapes.max_length, disable_dropout=False,  # keep LoRA's dropout, as tunesmith does
        precompute_ref_log_probs=variant.precompute_reference, padding_free=variant.padding_free,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)


def run_trl(variant: Variant, spec: dict) -> dict:
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    dtype = getattr(torch, spec["dtype"])
    location = str(resolve(MODEL))  # the folder tunesmith trains from: the very same weights
    dataset = datasets.Dataset.from_list(json.loads(Path(spec["tokens"]).read_text()))
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=spec["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")
    precompute = {"seconds": 0.0}

    class Pretokenized(DPOTrainer):
        """tunesmith's token ids as given (TRL's tokenization skipped), in the dataset's order."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if not variant.group_by_length:
                return torch.utils.data.SequentialSampler(dataset)
            from transformers.trainer_pt_utils import LengthGroupedSampler

            lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                       for r in dataset]  # the longer sequence of each pair sets its padded width
            generator = torch.Generator().manual_seed(SEED)
            return LengthGroupedSampler(self.args.train_batch_size, lengths=lengths, generator=generator)

        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            precompute["seconds"] += time.perf_counter() - started
            return out

    torch.manual_seed(SEED)  # as tunesmith seeds before wrapping the model: LoRA's A starts the same
    trainer = Pretokenized(model=model, args=_trl_config(variant, spec, dtype), train_dataset=dataset,
                           processing_class=tokenizer, peft_config=lora)
    counting = CountingCollator(trainer.data_collator)
    trainer.data_collator = counting
    timer = _trl_timer()
    trainer.add_callback(timer)
    trainer.train()
    steps = []
    for k, end in enumerate(timer.ends):
        seconds = end - timer.ends[k - 1] if k else math.nan  # step 1's start is not marked
        steps.append({"tokens": counting.tokens[k], "seconds": seconds, **timer.logs.get(k + 1, {})})
    return {"steps": steps, "precompute_seconds": precompute["seconds"], "trl_version": trl.__version__,
            "padding_free_used": bool(getattr(trainer, "padding_free", False))}


# ---------------------------------------------------------------------------------------------
# The parent: data, runs, table.

@dataclass
class Row:
    variant: Variant
    ok: bool
    error: str = ""
    wall_seconds: float = 0.0
    peak_bytes: int = 0
    steps: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    other_cpu_share: float = math.nan  # CPU the rest of the machine used meanwhile, share of all cores

    @property
    def timed(self) -> list[dict]:
        return self.steps[1:]  # step 1 is the warm-up

    def total(self, key: str) -> float:
        return float(sum(s[key] for s in self.timed))

    @property
    def rate(self) -> float:
        return self.total("tokens") / max(self.total("seconds"), 1e-9)

    @property
    def rate_with_precompute(self) -> float:
        """The reference pass before step 1 covers every step's pairs: the timed steps' share is added."""
        share = self.total("tokens") / max(sum(s["tokens"] for s in self.steps), 1)
        seconds = self.total("seconds") + share * self.extra.get("precompute_seconds", 0.0)
        return self.total("tokens") / max(seconds, 1e-9)

    def tail(self, key: str) -> float:
        values = [s.get(key, math.nan) for s in self.steps[-min(TAIL_STEPS, max(1, len(self.steps) - 1)):]]
        return statistics.mean(values) if values else math.nan


def run_child(variant: Variant, spec: dict, work_dir: Path) -> Row:
    run_dir = work_dir / variant.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, not a resume of an older one
    spec = {**spec, "variant": variant.__dict__, "run_dir": str(run_dir),
            "result": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)
    busy_before = busy_cpu_seconds()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir / "spec.json")]
    child = run_measured(command, run_dir / "child.log", HERE.parent, CHILD_TIMEOUT_SECONDS)
    row = Row(variant, ok=False, wall_seconds=child.wall_seconds, peak_bytes=child.peak_bytes)
    others = busy_cpu_seconds() - busy_before - child.cpu_seconds
    row.other_cpu_share = max(0.0, others) / (row.wall_seconds * (os.cpu_count() or 1))
    if child.returncode != 0 or not Path(spec["result"]).is_file():
        row.error = last_error(run_dir / "child.log", child.returncode)
        return row
    result = json.loads(Path(spec["result"]).read_text())
    row.ok, row.steps, row.extra = True, result.pop("steps"), result
    return row


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) since boot."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def prepare_data(args, shapes: Shapes, work_dir: Path) -> tuple[Path, Path, dict]:
    """Write the pairs every run reads, tokenize them with tunesmith, and write the token ids TRL gets
    (prompt, chosen, rejected), pair by pair in the order of tunesmith's step plan."""
    from tunesmith.data.prepare import prepare
    from tunesmith.model.load import load_tokenizer

    n_pairs = shapes.pairs_per_step * (shapes.steps + 1)
    rows, source = make_pairs(n_pairs, args.seed, shapes.answer_chars)
    data_path = work_dir / "pairs.jsonl"
    write_jsonl_atomic(data_path, rows)
    tokenizer = load_tokenizer(resolve(MODEL), quiet=True)
    config = tunesmith_config(data_path, work_dir / "prepared", shapes, args.precision, args.dropout)
    prepared = prepare(config, tokenizer, force=True)
    split = prepared.splits["train"]
    if len(split) // 2 < n_pairs:
        raise SystemExit(f"prepare kept {len(split) // 2} of {n_pairs} pairs (see {work_dir / 'prepared'})")
    plan = step_plan(split, shapes)
    order = [p for step in range(plan.total_steps) for p in plan.step_indices(step)]
    tokens_path = work_dir / "trl_tokens.json"
    tokens_path.write_text(json.dumps([trl_row(split, p) for p in order]))
    lengths = split.lengths.tolist()
    answers = [int(n) for n in split.target_counts().tolist()]
    facts = {"source": source, "pairs": len(order), "tokens": sum(pair_tokens(split, [p]) for p in order),
             "sequence": _spread(lengths), "answer": _spread(answers),
             "truncated": prepared.manifest["counts"]["train"].get("truncated", 0), "example": rows[0]}
    return data_path, tokens_path, facts


def trl_row(split: TokenizedSplit, pair: int) -> dict:
    """One pair as TRL's collator takes it: the shared prompt ids, then each answer's ids (all supervised)."""
    (chosen, chosen_mask), (rejected, rejected_mask) = split.example(2 * pair), split.example(2 * pair + 1)
    start = int(chosen_mask.nonzero()[0])
    assert int(rejected_mask.nonzero()[0]) == start and torch.equal(chosen[:start], rejected[:start])
    assert bool(chosen_mask[start:].all()) and bool(rejected_mask[start:].all()), "answers run to the end"
    return {"prompt_ids": chosen[:start].tolist(), "chosen_ids": chosen[start:].tolist(),
            "rejected_ids": rejected[start:].tolist()}


def _spread(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2],
            "mean": round(statistics.mean(ordered), 1), "max": ordered[-1]}


# ---------------------------------------------------------------------------------------------
# Reporting.

def cpu_lines() -> list[str]:
    import psutil

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = [line.split(":", 1) for line in info.splitlines() if ":" in line]
    model = next((value.strip() for key, value in fields if key.strip() == "model name"), "unknown CPU")
    flags = next((value.split() for key, value in fields if key.strip() == "flags"), [])
    wide = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    memory = psutil.virtual_memory().total / 2**30
    return [(f"- CPU: {model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
             f"{memory:.0f} GiB RAM; flags: {' '.join(wide) or 'none of avx2/avx512/amx'}")]


def software_line() -> str:
    import platform

    import peft
    import transformers
    import trl

    return (f"- Software: Python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def table_lines(rows: list[Row]) -> list[str]:
    lines = [("| tool / setting | tokens/s | tokens/s incl. reference pass | peak RSS (MiB) | final loss "
             "| reward accuracy | timed s (steps) | reference pass s | wall s | other processes' CPU |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        v = row.variant
        if not row.ok:
            lines.append(f"| {v.name}: {v.settings} | failed: {row.error.replace('|', '/')} | | | | | | "
                         f"| {_fmt(row.wall_seconds)} | {_fmt(100 * row.other_cpu_share)}% |")
            continue
        reference = row.extra.get("precompute_seconds", 0.0)
        lines.append(f"| {v.name}: {v.settings} | {_fmt(row.rate)} | {_fmt(row.rate_with_precompute)} "
                     f"| {_fmt(row.peak_bytes / 2**20)} | {_fmt(row.tail('loss'), 4)} "
                     f"| {_fmt(100 * row.tail('accuracy'))}% "
                     f"| {_fmt(row.total('seconds'), 1)} ({len(row.timed)}) "
                     f"| {_fmt(reference, 1) if reference else '-'} | {_fmt(row.wall_seconds)} "
                     f"| {_fmt(100 * row.other_cpu_share)}% |")
    return lines


def comparison_lines(rows: list[Row]) -> list[str]:
    ours = next((r for r in rows if r.variant.name == "tunesmith" and r.ok), None)
    theirs = [r for r in rows if r.variant.tool == "trl" and r.ok]
    if ours is None or not theirs:
        return ["- Ratio: needs a successful `tunesmith` row and at least one TRL row."]
    fastest = max(theirs, key=lambda r: r.rate_with_precompute)
    speed, memory = ours.rate / fastest.rate_with_precompute, ours.peak_bytes / fastest.peak_bytes
    lines = [(f"- **tunesmith / TRL's fastest ({fastest.variant.name}) = {speed:.2f}x tokens/s at "
              f"{memory:.2f}x its peak RSS** (target: >= 1.5x at <= 1.0x)")]
    for other in theirs:
        same = [s["tokens"] for s in ours.steps] == [s["tokens"] for s in other.steps]
        gaps = [abs(a["loss"] - b.get("loss", math.nan)) for a, b in zip(ours.steps, other.steps)]
        how = "the same tokens in every step" if same else "DIFFERENT tokens per step"
        if other.variant.group_by_length:
            how, gaps = "other pairs in each step (grouped by length), the same pairs overall", []
        lines.append(f"- vs {other.variant.name}: {ours.rate / other.rate_with_precompute:.2f}x tokens/s "
                     f"({ours.rate / other.rate:.2f}x against its steps alone), "
                     f"{ours.peak_bytes / other.peak_bytes:.2f}x peak RSS; "
                     f"{how}" + (f", per-step losses differ by at most {_fmt(max(gaps), 4)}" if gaps else ""))
    return lines


def report(args, shapes: Shapes, rows: list[Row], facts: dict, dtype: torch.dtype, load: str) -> list[str]:
    precision = str(dtype).replace("torch.", "")
    work = (f"SmolLM2-135M-Instruct, DPO sigmoid beta {BETA}, reference = the adapter switched off, "
            f"LoRA r=16 alpha=32 dropout {args.dropout} on all linear layers, {shapes.pairs_per_step} pairs "
            f"({2 * shapes.pairs_per_step} sequences) per optimizer step, no accumulation, max length "
            f"{shapes.max_length}, AdamW lr {LEARNING_RATE} constant, grad clip 1.0, {precision} for both "
            f"(`--precision {args.precision}`); {shapes.steps + 1} steps ({facts['pairs']} pairs, "
            f"{facts['tokens']:,} tokens), step 1 a warm-up, not timed")
    seq, ans = facts["sequence"], facts["answer"]
    data = (f"{facts['source']}; sequences (chat template + prompt + answer) {seq['min']}-{seq['max']} "
            "tokens "
            f"(median {seq['median']}, mean {seq['mean']}), answers {ans['min']}-{ans['max']} tokens (median "
            f"{ans['median']}); {facts['truncated']} truncated. First pair: "
            f"{json.dumps(facts['example'])[:300]}...")
    return ["## Preference tuning: tunesmith DPO vs TRL DPOTrainer (bench/preference_speed.py)", "",
            *cpu_lines(), software_line(),
            (f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; load average "
            f"before the runs: {load}"),
            f"- Command: `{' '.join([_shown_python(), *sys.argv])}`", f"- Work: {work}",
            f"- Data: {data}", "",
            *table_lines(rows), "", *comparison_lines(rows), "", *NOTES]


NOTES = [
    "Notes:",
    ("- tokens/s: real tokens (no padding) of the chosen and rejected sequences, prompts included, per "
     "second of steps 2..N+1; the reference pass over the same sequences is part of the work, not counted "
     "again. "
     "`incl. reference pass` adds TRL's precompute_ref_log_probs pass (made before step 1, so outside its "
     "steps) in proportion to the timed steps' tokens; the ratio line uses that rate."),
    ("- Peak RSS: the kernel's peak resident set of each run's own process (wait4), model loading included."),
    ("- Other processes' CPU: what the rest of the machine used while the run went on (busy CPU time of all "
     "processes from /proc/stat minus the run's own, over wall time x cores); near 0% means nothing else "
     "ran."),
    ("- TRL gets tunesmith's token ids (its tokenization skipped: `_prepare_dataset` returns the dataset as "
     "given) and its own DataCollatorForPreference pads the chosen and the rejected sequences into one "
     "batch; LoRA's dropout is kept (disable_dropout=False) since tunesmith keeps it. Both seed torch with "
     "42 before wrapping the model, so LoRA starts from the same weights; the dropout masks differ, so "
     "losses agree only roughly. "
     "With `--dropout 0 --precision fp32` the two tools' per-step losses are the same to 5 decimals."),
    ("- trl-grouped: transformers' LengthGroupedSampler (seeded) puts pairs of similar length in a step, so "
     "TRL pads less; its steps hold other pairs than tunesmith's, the run the same pairs and tokens overall. "
     "TRL's precompute pass itself goes through the pairs in order, padded."),
    ("- TRL 1.16's padding_free is disabled for DPO (the trainer warns and falls back to padding); "
     "gradient checkpointing is off in the TRL rows except trl-gc (its default)."),
]


def _shown_python() -> str:
    python = Path(sys.executable)
    try:
        return str(python.relative_to(Path.cwd()))
    except ValueError:
        return str(python) if ".venv" in python.parts else python.name


def write_results(path: Path, section: list[str]) -> None:
    """Replace this script's section of the file (between its markers), keeping every other section."""
    from results_md import write_section  # bench/ is on the path of a script run from it

    write_section(path, "preference_speed", section)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps after one warm-up (default "
                        f"{Shapes.steps}; --quick: {QUICK.steps})")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (2 pairs per step, max length 128, "
                        "short answers) and 2 timed steps: checks the script end to end")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated run names (default: "
                        f"{DEFAULT_RUNS}; all: " + ", ".join(v.name for v in VARIANTS) + ")")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="one precision for both tools (auto: what tunesmith picks here)")
    parser.add_argument("--dropout", type=float, default=0.05,
                        help="LoRA dropout for both (0: losses comparable step by step)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the pair sampling")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "preference_speed")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md",
                        help="markdown file --write updates")
    parser.add_argument("--write", action="store_true", help="write the section into --results")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    base = QUICK if args.quick else Shapes()
    shapes = Shapes(**{**base.__dict__, "steps": args.steps or base.steps})
    by_name = {v.name: v for v in VARIANTS}
    names = [v.name for v in VARIANTS] if args.runs == "all" else args.runs.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(by_name)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dtype = pick_dtype(args.precision, pick_device("auto"))
    load = load_average()
    pairs = shapes.pairs_per_step * (shapes.steps + 1)
    print(f"Preparing {pairs} pairs; load average {load} ...", file=sys.stderr)
    data_path, tokens_path, facts = prepare_data(args, shapes, args.work_dir)
    spec = {"data": str(data_path), "tokens": str(tokens_path), "shapes": shapes.__dict__,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "dtype": str(dtype).replace("torch.", ""), "dropout": args.dropout}
    rows = []
    for name in names:
        print(f"Running {name} ...", file=sys.stderr, flush=True)
        row = run_child(by_name[name], spec, args.work_dir)
        print(f"  {'ok' if row.ok else row.error}  ({row.wall_seconds:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    lines = report(args, shapes, rows, facts, dtype, load)
    print("\n".join(lines))
    if args.write:
        write_results(args.results, lines)
        print(f"\nWrote {args.results}", file=sys.stderr)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
