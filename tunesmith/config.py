"""Typed run configuration: YAML and `--section.key value` flags only fill it in.

Every field is documented where it is declared; `tunesmith <verb> --help` prints those docs.
Validation collects every problem before it reports, so a user fixes a config in one pass.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunesmith.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Phrases that mark a response as canned assistant boilerplate rather than an answer.
DEFAULT_DROP_PHRASES = [
    "as an ai language model", "as an ai assistant", "i'm just an ai",
    "i am just an ai", "i cannot fulfill", "i can't fulfill", "i'm unable to fulfill",
    "i cannot provide assistance with", "trained by openai", "developed by openai",
    "my knowledge cutoff", "i don't have personal opinions", "i do not have personal opinions",
    "i hope this helps!",
]


class CleanConfig(Section):
    whitespace: bool = Field(True, description="normalise whitespace: CRLF to LF, trailing spaces, odd "
                             "spaces (NBSP, zero-width), 3+ blank lines; indentation is kept")
    strip_prefixes: list[str] = Field([], description="prefixes cut from the start of every message, "
                                      "e.g. ['Q. ', 'A. ']")
    drop_phrases: list[str] = Field(DEFAULT_DROP_PHRASES, description="rows whose response contains one "
                                    "of these (ignoring case) are removed; [] keeps all; not applied to "
                                    "documents (data.format text)")
    drop_empty: bool = Field(True, description="drop rows with an empty prompt or response (counted) "
                             "instead of stopping with an error")
    dedup: bool = Field(True, description="remove exact duplicate rows (same prompt and response, "
                        "ignoring case, spacing and punctuation)")
    near_dup_threshold: float | None = Field(
        0.85, gt=0.0, le=1.0, description="remove near-duplicates: rows whose prompt and response both "
        "reach this word-trigram Jaccard similarity (MinHash); none disables")
    min_tokens: int = Field(0, ge=0, description="drop examples with fewer tokens than this "
                            "(prompt + response; documents for data.format text)")
    max_tokens: int | None = Field(None, ge=1, description="drop examples longer than this many "
                                   "tokens instead of truncating them at max_seq_length")
    leakage: Literal["remove", "report"] = Field(
        "remove", description="val/test rows that duplicate (exactly or nearly) a train row: remove "
        "them (honest evaluation) or only report them")


# Fields a data.columns mapping may fill, by the row shape that reads them.
COLUMN_TARGETS = ("instruction", "input", "output", "question", "answer", "prompt", "completion",
                  "response", "messages", "conversations", "text", "system", "chosen", "rejected", "label")


class DataConfig(Section):
    path: str | None = Field(None, description="training data: JSON/JSONL, CSV/TSV, Parquet, HTML file "
                             "or folder, SQLite database, .sql dump, folder of .txt/.md files, or a "
                             "datasets folder written by save_to_disk")
    val_path: str | None = Field(None, description="explicit validation file (else split from path)")
    test_path: str | None = Field(None, description="explicit test file (else split from path)")
    format: Literal["auto", "alpaca", "qa", "prompt_completion", "messages", "sharegpt", "text",
                    "preference", "hh", "kto"] = Field(
        "auto", description="row shape; auto detects it from the keys and says which it chose; "
        "text: continued pre-training on raw documents, every token trained on; preference: "
        "prompt/chosen/rejected; hh: full chosen/rejected conversations; kto: prompt/completion/label")
    columns: dict[str, str] | None = Field(None, description="our field <- your column: {question: "
                                           "Description, answer: Doctor} (flags: --data.columns.question "
                                           "Description)")
    query: str | None = Field(None, description="SQLite database or .sql dump: the SELECT giving the rows")
    table: str | None = Field(None, description="SQLite database or .sql dump: the table giving the rows "
                              "(instead of query)")
    html_split: Literal["page", "headings"] = Field(
        "page", description="HTML: one row per page, or one per section under each heading "
        "(fields title, heading, body, text)")
    assistant_turns: Literal["all", "last"] = Field(
        "all", description="multi-turn chats: train on every assistant turn, or only the last")
    folds: int = Field(1, ge=1, description="k > 1: k-fold cross-validation; after the test split the "
                       "rows are cut into k parts and fold i validates on part i (val_split unused)")
    fold: int = Field(0, ge=0, description="with folds > 1: the one fold to prepare/train (1..folds); "
                      "0 runs every fold in turn, each in <run>/fold-<i>")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="cleaning before the split")
    template: str = Field(
        "auto", description="auto (model's chat template, else alpaca) | chat | alpaca | qa | "
        "a custom string with {prompt} (and optionally {input}, {system})")
    system_prompt: str | None = Field(None, description="system message for chat templates")
    mask_prompt: bool = Field(True, description="train on responses only (prompt labels are -100)")
    max_seq_length: int = Field(512, ge=8, le=10**7, description="tokens per example; longer ones are truncated")
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows held out for validation")
    test_split: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows held out for testing")
    seed: int = Field(42, description="seed of the train/val/test shuffle")


class TrainConfig(Section):
    learning_rate: float | Literal["auto"] = Field(
        2e-4, description="peak learning rate after warmup; auto: found by a short range test before training "
        "(tunesmith lr-find; plot in plots/lr_find.png)")
    batch_size: int = Field(8, ge=1, le=1_000_000, description="examples per optimizer step")
    micro_batch_size: int = Field(8, ge=1, le=1_000_000, description="examples per forward pass "
                                  "(accumulation = batch/micro); unset: the largest divisor of batch_size up to 8")
    epochs: float = Field(1.0, gt=0, le=10**6, description="passes over the training split (ignored if max_steps "
                          "is set)")
    max_steps: int | None = Field(None, ge=1, le=10**9, description="optimizer steps; overrides epochs")
    warmup_steps: int = Field(10, ge=0, description="steps of linear warmup from 0 to learning_rate")
    lr_schedule: Literal["cosine", "linear", "constant", "step", "exponential", "cosine_restarts"] = Field(
        "cosine", description="decay after warmup: cosine | linear | constant | step (x lr_gamma every "
        "lr_step_size steps) | exponential (x lr_gamma every step) | cosine_restarts (SGDR cycles)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final rate as a share of the peak")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"] = Field(
        "adamw", description="adamw | adamw_8bit (bitsandbytes) | paged_adamw_8bit, paged_adamw_32bit (CUDA; "
        "adamw_8bit / adamw on CPU) | adafactor (factored second moments) | sgd (with momentum)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd: momentum (0 for plain SGD)")
    lr_step_size: int = Field(100, ge=1, description="step schedule: steps after warmup between decays")
    lr_gamma: float | None = Field(None, gt=0.0, le=1.0, description="step: factor per decay (default 0.5); "
                                   "exponential: factor per step (default: reaches min_lr_ratio at the last step)")
    restart_steps: int = Field(100, ge=1, description="cosine_restarts: length of the first cycle in steps")
    restart_mult: int = Field(1, ge=1, description="cosine_restarts: each cycle is this many times longer")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float | None = Field(1.0, description="max global gradient norm (none to disable)")
    eval_interval: int = Field(50, ge=0, description="steps between validation passes (0: only at the end)")
    eval_iters: int = Field(20, ge=1, description="validation micro batches per pass")
    save_interval: int = Field(100, ge=0, description="steps between resumable step-* checkpoints (0: none)")
    save_total_limit: int = Field(2, ge=1, description="step-* checkpoints kept (best/ and final/ always kept)")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many validation passes without improvement")
    max_bad_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row (each is skipped)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where it is faster: CUDA with bf16, a CPU whose measured bf16 matmul "
        "beats fp32 (AMX; with avx512_bf16 alone an AMD EPYC measured 2.2x, an Intel Xeon half); else fp32. "
        "bf16 halves the frozen weights' memory")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    compile: bool = Field(False, description="torch.compile each transformer layer (dynamic shapes); "
                          "off by default: see bench/RESULTS.md for what it pays here")
    compact_memory: bool = Field(False, description="CPU: hand freed activation memory straight back to "
                                 "the OS; peak RAM ~25% lower, steps ~40% slower (bench/RESULTS.md)")
    devices: int = Field(1, ge=1, description="data-parallel processes on this machine (GPUs, or CPU "
                         "processes); under torchrun the launcher decides")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp keeps a full copy of the model on each; fsdp "
        "(method full only) shards weights, gradients and optimizer state across them (FSDP2)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="CPU threads for the maths (default: one per core); "
                                "fewer when the CPU is shared with other work (a busy CPU is reported at start)")
    seed: int = Field(42, description="seed of model init, dropout and data order")
    log_interval: int = Field(10, ge=1, description="steps between metric log lines")
    tensorboard: bool = Field(False, description="also write TensorBoard scalars (loss, val loss, lr, "
                              "tokens/s, grad norm) to <run>/tensorboard (needs tunesmith[tensorboard])")
    loss_chunk_size: int = Field(1024, ge=16, description="supervised positions per chunk of the output layer")
    attention: Literal["auto", "per_example", "flash_varlen", "flex", "transformers"] = Field(
        "auto", description="attention over packed rows (each example sees only itself): auto (CPU: "
        "per_example; CUDA: flash_varlen where flash-attn is installed and the run is bf16, else flex) | "
        "per_example (SDPA on each example) | flash_varlen (FlashAttention's varlen kernel) | flex (PyTorch's "
        "flex attention, CUDA) | transformers (its own, from position ids); the choice is logged at start")
    loss_kernel: Literal["chunked", "liger", "cce"] = Field(
        "chunked", description="the output layer's loss: chunked (tunesmith's; never holds all logits) | "
        "liger (Liger's fused linear cross-entropy) | cce (cut cross-entropy); the fused ones are CUDA only "
        "and need tunesmith[gpu]")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="rank of the low-rank update")
    alpha: float = Field(32, gt=0, description="scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input (0: measured no worse "
                           "and faster, bench/RESULTS.md 'Defaults, measured')")
    target_modules: str | list[str] = Field(
        "all-linear", description="all-linear, or a list of module names (e.g. [q_proj, v_proj])")


class QloraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit format of the frozen base weights")
    double_quant: bool = Field(True, description="also quantize the per-block scales (saves ~0.4 bit/weight)")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for the maths (auto: the run's precision)")


class PromptAdapterConfig(Section):
    length: int = Field(10, ge=1, description="adapter (method: adapter): learned prompt tokens per layer")
    layers: int | None = Field(None, ge=1, description="adapter: top layers that get prompts (default: all)")


PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # trained on chosen/rejected pairs; kto on single answers
WEIGHT_METHODS = ("lora", "full", "qlora", "dora", "adapter")
# beta of each preference method when preference.beta is unset (the papers' usual values)
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


class PreferenceConfig(Section):
    weights: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora", description="method dpo/orpo/simpo/kto: which weights train (lora, qlora, dora, or all: full)")
    beta: float | None = Field(None, gt=0, description="strength of the preference: DPO/KTO's KL weight, "
                               "ORPO's odds-ratio weight, SimPO's reward scale (default: dpo 0.1, orpo 0.1, "
                               "simpo 2.0, kto 0.1)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo: sigmoid (the DPO paper), ipo (squared, from the IPO paper) or hinge")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo sigmoid: assumed share of pairs "
                                   "whose labels are flipped (conservative DPO)")
    gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin between chosen and rejected")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on desirable answers")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on undesirable answers")


class EvalConfig(Section):
    max_samples: int = Field(200, ge=1, description="test rows to generate answers for")
    max_new_tokens: int | None = Field(None, ge=1, description="answer length cap (default: from references)")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="prompts generated together; auto: as many as their KV cache (longest row plus the "
        "answer cap) fits in a quarter of the free memory, every test row at most")
    normalize: bool | list[Literal["case", "punctuation", "whitespace"]] = Field(
        False, description="compare answers ignoring case, punctuation and spacing (true), or only "
        "the listed ones, e.g. [case, whitespace]; applies to exact match, BLEU and ROUGE")
    compare_base: bool = Field(True, description="also evaluate the base model, side by side")
    group_by: str | None = Field(None, description="error analysis: the data field to group failures by "
                                 "(e.g. task); default: a field named task/category/type/... if the data has one")
    error_examples: int = Field(3, ge=0, description="error analysis: example rows shown per group")
    tasks: list[str] = Field([], description="benchmarks through lm-evaluation-harness, e.g. "
                             "arc_easy,hellaswag,mmlu,truthfulqa_mc2 (needs tunesmith[benchmarks])")
    tasks_dir: str | None = Field(None, description="folder of extra lm-eval task YAML files "
                                  "(local data, offline); searched before the built-in tasks")
    tasks_limit: int | None = Field(None, ge=1, description="benchmarks: at most this many examples per task")
    tasks_fewshot: int | None = Field(None, ge=0, description="benchmarks: few-shot examples (default: the task's)")
    bias: bool = Field(False, description="run the counterfactual bias probe (swapped names, pronouns, "
                       "nationalities): log-likelihood of the same answers, base vs tuned")
    bias_pairs: str | None = Field(None, description="bias probe: a YAML/JSONL file of extra probes "
                                   "{prompt with {X}, swap: [a, b], answers: [...], category}")
    bias_threshold: float = Field(1.0, gt=0, description="bias probe: flag an answer whose share among the "
                                  "probe's answers shifts by more than this between the swapped prompts "
                                  "(nats; 1.0 = 2.7x)")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value):
        """--eval.tasks arc_easy,hellaswag arrives as one string."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @property
    def fixed_batch(self) -> int:
        """batch_size for the benchmark harness and the bias probe, which take a number (auto: 32)."""
        return self.batch_size if isinstance(self.batch_size, int) else 32


class RunConfig(Section):
    model: str = Field(DEFAULT_MODEL, description="alias, local HF directory, .gguf file, or hub id")
    method: Literal["lora", "full", "qlora", "dora", "adapter", "dpo", "orpo", "simpo", "kto"] = Field(
        "lora", description="lora (low-rank adapter) | full (all weights) | qlora (LoRA on a 4-bit base) | "
        "dora (weight-decomposed LoRA) | adapter (LLaMA-Adapter prompts; llama, mistral, gpt2) | "
        "preference tuning on chosen/rejected pairs: dpo | orpo | simpo | kto (weights: preference.weights)")
    init_from: str | None = Field(None, description="start from a finished run's model (its final/ "
                                  "adapter merged into the base, or its full weights), e.g. an SFT run "
                                  "before dpo; the reference model of dpo/kto is that starting point")
    name: str | None = Field(None, description="run name (default: from the data file)")
    out_dir: str | None = Field(None, description="run directory (default: out/<name>)")
    resume: bool | str = Field(False, description="finetune: continue from the latest complete step-* "
                               "checkpoint (true) or from the given checkpoint folder")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QloraConfig = Field(default_factory=QloraConfig)
    adapter: PromptAdapterConfig = Field(default_factory=PromptAdapterConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def weights(self) -> str:
        """Which weights train: the method itself, or preference.weights for a preference method."""
        return self.preference.weights if self.method in PREFERENCE_METHODS else self.method

    @property
    def objective(self) -> str:
        """What the loss is: sft (next-token cross-entropy on responses) or a preference method."""
        return self.method if self.method in PREFERENCE_METHODS else "sft"

    @property
    def beta(self) -> float:
        return self.preference.beta if self.preference.beta is not None else DEFAULT_BETA.get(self.method, 0.1)

    @property
    def run_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path("out") / (self.name or _default_name(self.data.path))

    @property
    def accumulation_steps(self) -> int:
        return self.train.batch_size // self.train.micro_batch_size


def _default_name(path: str | None) -> str:
    stem = Path(path).stem if path else "run"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "run"


SECTIONS = {"data": DataConfig, "train": TrainConfig, "lora": LoraConfig, "qlora": QloraConfig,
            "adapter": PromptAdapterConfig, "preference": PreferenceConfig, "eval": EvalConfig}


def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every config key, in declaration order: the source of --help."""
    rows = []
    for name, field in RunConfig.model_fields.items():
        if name in SECTIONS:
            rows += _section_docs(name, SECTIONS[name])
        else:
            rows.append((name, _show(field.default), field.description or ""))
    return rows


def _section_docs(prefix: str, section: type[Section]) -> list[tuple[str, str, str]]:
    rows = []
    for key, sub in section.model_fields.items():
        nested = sub.annotation if isinstance(sub.annotation, type) else None
        if nested is not None and issubclass(nested, Section):  # e.g. data.clean.*
            rows += _section_docs(f"{prefix}.{key}", nested)
        else:
            rows.append((f"{prefix}.{key}", _show(sub.default), sub.description or ""))
    return rows


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def keys_help() -> list[str]:
    """The lines of `--help` that list every config key with its meaning and default."""
    return ["config keys (YAML or --key value):",
            *(f"  --{key:32} {doc} [default: {default}]" for key, default, doc in field_docs())]


def from_args(args: list[str]) -> RunConfig:
    """[CONFIG | RUN_DIR] then overrides, as every config verb reads them. A run directory means its
    saved config.yaml, with out_dir the directory itself."""
    path = None
    if args and not args[0].startswith("--"):
        path, args = Path(args[0]), args[1:]
        if path.is_dir():
            if not (path / "config.yaml").is_file():
                raise ConfigError(f"{path} is a directory without config.yaml (not a run directory)")
            args = [f"--out_dir={path}", *args]
            path = path / "config.yaml"
    return load(path, parse_overrides(args))


def all_keys() -> list[str]:
    return [key for key, _, _ in field_docs()]


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.max_steps 30 --data.path x.jsonl` → nested dict; values parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ConfigError(f"unexpected argument {flag!r}: config overrides look like --train.max_steps 30")
        key = flag[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:  # a bare flag: --resume means resume: true
            raw = "true"
            i += 1
        set_dotted(overrides, key, _parse_scalar(raw))
    return overrides


def _parse_scalar(raw: str) -> Any:
    if raw.strip().lower() in ("none", "null", "~"):
        return None  # --help shows unset values as "none"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # Text YAML reads as a comment or a mapping ("### Q: {prompt}", a custom template) is literal.
    return raw if value is None or isinstance(value, dict) else value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        tree = node
    tree[parts[-1]] = value


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return raw


def build(raw: dict, base_dir: Path | None = None) -> RunConfig:
    """Validate a raw dict into a RunConfig, reporting every problem at once."""
    raw = with_micro_batch_following(raw)
    problems = []
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        config = None
    problems += semantic_problems(_Lookup(raw))
    if problems:
        raise ConfigError(problems)
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    return config


def with_micro_batch_following(raw: dict) -> dict:
    """An unset train.micro_batch_size follows train.batch_size: the largest divisor of the batch
    size up to the default (batch_size 4 -> micro 4, 12 -> 6), so `--train.batch_size 4` alone is
    not refused. A micro batch the user set stays theirs, and a conflict stays an error."""
    train = raw.get("train")
    if not isinstance(train, dict) or "micro_batch_size" in train:
        return raw
    batch = train.get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        return raw
    ceiling = TrainConfig.model_fields["micro_batch_size"].default
    micro = max(d for d in range(1, min(batch, ceiling) + 1) if batch % d == 0)
    return {**raw, "train": {**train, "micro_batch_size": micro}}


class _Lookup:
    """Dotted access to raw values with declared defaults, so cross-key checks also run when
    some other key is invalid (all problems are reported together)."""

    def __init__(self, raw: dict):
        self.raw = raw

    def get(self, dotted: str):
        if "." not in dotted:  # a top-level key such as method
            return self.raw.get(dotted, RunConfig.model_fields[dotted].default)
        section, key = dotted.split(".")
        node = self.raw.get(section)
        if isinstance(node, dict) and key in node:
            return node[key]
        return SECTIONS[section].model_fields[key].default


def load(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    raw = read_yaml(path) if path else {}
    raw = merge(raw, overrides or {})
    base_dir = Path(path).resolve().parent if path else None
    return build(raw, base_dir)


def _resolve_paths(config: RunConfig, base_dir: Path) -> None:
    """Data paths in a config file are relative to that file, as a user reading it expects."""
    for key in ("path", "val_path", "test_path"):
        value = getattr(config.data, key)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            candidate = base_dir / value
            if candidate.exists():
                setattr(config.data, key, str(candidate))


def semantic_problems(values: _Lookup) -> list[str]:
    problems = []
    batch, micro = values.get("train.batch_size"), values.get("train.micro_batch_size")
    if _all(int, batch, micro) and micro > 0 and batch % micro:
        problems.append(f"train.batch_size={batch} is not a multiple of train.micro_batch_size={micro}")
    val, test = values.get("data.val_split"), values.get("data.test_split")
    if _all((int, float), val, test) and val + test >= 1.0:
        problems.append(f"data.val_split={val} + data.test_split={test} leave no training rows")
    problems += _data_problems(values)
    devices = values.get("train.devices")
    if _all(int, devices, batch) and devices > batch:
        problems.append(f"train.devices={devices} is more than train.batch_size={batch}: "
                        "each device needs at least one example per step")
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)  # processes started by the user's own torchrun
    if isinstance(batch, int) and launched > batch:
        problems.append(f"torchrun started {launched} processes but train.batch_size={batch}: each process "
                        "needs at least one example per step")
    rate = values.get("train.learning_rate")
    if _all((int, float), rate) and rate <= 0:
        problems.append(f"train.learning_rate={rate} must be above 0 (or auto, to have it found)")
    generated = values.get("eval.batch_size")
    if _all(int, generated) and generated < 1:
        problems.append(f"eval.batch_size={generated} must be at least 1 (or auto)")
    clip = values.get("train.grad_clip")
    if _all((int, float), clip) and clip <= 0:
        problems.append(f"train.grad_clip={clip} must be above 0 (set it to null to turn clipping off)")
    problems += _method_problems(values)
    return problems


def _method_problems(values: _Lookup) -> list[str]:
    problems = []
    method = values.get("method")
    if not isinstance(method, str):
        return problems
    preference = method in PREFERENCE_METHODS
    weights = values.get("preference.weights") if preference else method
    if values.get("train.strategy") == "fsdp" and preference:
        problems.append(f"train.strategy=fsdp is for supervised full fine-tunes; method={method} runs on "
                        "ddp (use train.strategy=ddp)")
    elif values.get("train.strategy") == "fsdp" and weights != "full":
        problems.append(f"train.strategy=fsdp shards a full fine-tune; method={method} trains small adapters "
                        "that every process can hold whole: use train.strategy=ddp")
    data_format = values.get("data.format")
    pair_formats, sft_formats = ("preference", "hh"), ("alpaca", "qa", "prompt_completion", "messages",
                                                       "sharegpt", "text")
    if preference and method != "kto" and data_format in sft_formats + ("kto",):
        problems.append(f"data.format={data_format} has no rejected answers; method={method} needs pairs "
                        "(data.format preference or hh, or auto)")
    if method == "kto" and data_format in sft_formats:
        problems.append(f"data.format={data_format} has no labels; method=kto needs data.format kto, "
                        "preference or hh (pairs count as one desirable and one undesirable answer)")
    if not preference and data_format in pair_formats + ("kto",):
        problems.append(f"data.format={data_format} is preference data; train it with method dpo, orpo, "
                        "simpo or kto")
    return problems


def _data_problems(values: _Lookup) -> list[str]:
    problems = []
    folds, fold = values.get("data.folds"), values.get("data.fold")
    if _all(int, folds, fold) and folds > 1 and fold > folds:
        problems.append(f"data.fold={fold} is more than data.folds={folds}")
    if _all(int, folds, fold) and folds == 1 and fold > 0:
        problems.append(f"data.fold={fold} needs data.folds > 1 (k-fold cross-validation)")
    if _all(int, folds) and folds > 1 and values.get("data.val_path"):
        problems.append("data.folds > 1 makes the validation parts itself; drop data.val_path")
    columns = values.get("data.columns")
    if isinstance(columns, dict):
        for target in columns:
            if target not in COLUMN_TARGETS:
                close = difflib.get_close_matches(str(target), COLUMN_TARGETS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"data.columns.{target}: not a field tunesmith reads{hint}; "
                                f"fields: {', '.join(COLUMN_TARGETS)}")
    if values.get("data.query") and values.get("data.table"):
        problems.append("data.query and data.table both set: give one")
    return problems


def _all(kind, *values) -> bool:
    return all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


# Names users bring from other tools, and what they are called here.
FAMILIAR_NAMES = {
    "lr": "learning_rate", "num_train_epochs": "epochs", "num_epochs": "epochs", "steps": "max_steps",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "batch_size",
    "max_length": "max_seq_length", "seq_len": "max_seq_length", "cutoff_len": "max_seq_length",
    "warmup": "warmup_steps", "lr_scheduler_type": "lr_schedule", "max_grad_norm": "grad_clip",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "dataset": "path",
}


def _suggest(loc: str) -> str | None:
    section, _, key = loc.rpartition(".")
    familiar = FAMILIAR_NAMES.get(key)
    candidates = all_keys()
    if familiar:
        matches = [k for k in candidates if k.rpartition(".")[2] == familiar]
        same_section = [k for k in matches if k.startswith(section + ".")] if section else []
        if same_section or matches:
            return (same_section or matches)[0]
    close = difflib.get_close_matches(loc, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        close = _suggest(loc)
        hint = f" (did you mean {close}?)" if close else ""
        return f"unknown key {loc}{hint}"
    if error["type"] == "literal_error":
        return f"{loc}={error['input']!r} is not one of {error['ctx']['expected']}"
    return f"{loc}={error.get('input')!r}: {error['msg'].lower()}"


def dump(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
