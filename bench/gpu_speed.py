"""Training speed on one GPU, side by side: tunesmith against TRL's SFTTrainer (+ PEFT) and Unsloth.

    python bench/gpu_speed.py [--lengths 512,2048] [--steps N] [--runs a,b,...] [--tiny] [--results FILE]

The model is SmolLM2-1.7B's layer shape (hidden 2048, MLP 8192, 32 heads) with 16 of its 24 layers:
about 1.1B parameters with random weights, in bf16, and SmolLM2's tokenizer. It is built once from
the embedded SmolLM2-135M's config and tokenizer (no download). Random weights change nothing in
the speed or memory of a step; the loss column is then only a check that every tool trains on the
same tokens. --tiny swaps in 2 layers of width 64 and short rows, so the whole script runs end to
end on a CPU in minutes (a test runs it so); its figures mean nothing.

At each sequence length L every tool does the same work: rows of L/8..L tokens (log-normal around
L/2, prompt masked), about 8,192 real tokens per optimizer step, LoRA r=16 alpha=32 on every linear
layer, AdamW at a constant 2e-4, bf16. The runs are train_speed.py's children, one process each,
on the same token ids in the same order (TRL gets tunesmith's tokenization); TRL uses
FlashAttention 2 where it is installed, else SDPA. Unsloth runs where it imports (its own model
patching, TRL's trainer, its default gradient checkpointing); a QLoRA pair (nf4, double
quantization) runs at the first length.

Memory: the child's torch.cuda.max_memory_allocated, and the most nvidia-smi showed in use on the
GPU during the run minus what it showed before (sampled every 0.2 s). MFU: tunesmith's FlopModel
(useful FLOPs: no padding, output layer only at supervised positions) over the bf16 matmul peak
measured here. bench/gpu_check.sh runs this and tests/test_cuda_kernels.py on a lent GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
import train_speed as ts  # bench/ is on the path of a script run from it

from tunesmith.device import pick_device
from tunesmith.model.load import resolve

HERE = Path(__file__).resolve().parent
TOKENS_PER_STEP = 8192
FULL = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 32}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
RESULTS_SECTION = "gpu_speed"

V = ts.Variant
VARIANTS = [  # in the order they run: the comparison that matters most first, in case a run is cut short
    V("tunesmith", "tunesmith", "defaults: packed rows, train.attention auto (see the log line), chunked loss"),
    V("trl-padding-free", "trl", "padding_free", batching="padding_free"),
    V("trl-packing", "trl", "packing (bfd, rows of max length)", batching="packing"),
    V("tunesmith-liger", "tunesmith", "+ train.loss_kernel liger (Liger's fused linear cross-entropy)",
      loss_kernel="liger"),
    V("trl-padded", "trl", "padded batches", batching="padded"),
    V("tunesmith-cce", "tunesmith", "+ train.loss_kernel cce (cut cross-entropy)", loss_kernel="cce"),
    V("unsloth", "unsloth", "Unsloth (FastLanguageModel + TRL, padding_free, its gradient checkpointing)",
      batching="padding_free"),
    V("tunesmith-qlora", "tunesmith", "QLoRA: nf4 frozen weights, double quantization", method="qlora"),
    V("trl-qlora", "trl", "QLoRA: nf4, double quantization, padding_free", batching="padding_free", method="qlora"),
    V("tunesmith-hf-attention", "tunesmith", "train.attention transformers (packing read from position ids)",
      attention="transformers", core=False),
    V("tunesmith-gc", "tunesmith", "+ gradient checkpointing", gradient_checkpointing=True, core=False),
    V("trl-padded-gc", "trl", "padded batches, gradient checkpointing (TRL's default)", batching="padded",
      gradient_checkpointing=True, core=False),
]
QLORA_ROWS = {"tunesmith-qlora", "trl-qlora"}  # the first length only


def shape_for(length: int, tiny: bool) -> ts.Shape:
    batch = max(2, TOKENS_PER_STEP // (length // 2)) if not tiny else 4
    return ts.Shape(f"seq{length}", f"rows up to {length} tokens (log-normal around {length // 2})", batch, length,
                    length // 2, 0.5, max(8, length // 8), length, 3 if tiny else 10)


def build_model(folder: Path, tiny: bool, base: Path | None) -> Path:
    """A random-weight model of the chosen shape with SmolLM2's config and tokenizer (once); base:
    a folder holding them (bench/gpu_wheels.sh copies them for a machine without the embedded model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    marker = folder / "built.json"
    shape = TINY if tiny else FULL
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return folder
    base = base or Path(resolve(ts.MODEL))
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(base):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges", "chat_template")):
            shutil.copy(base / name, folder / name)
    config = AutoConfig.from_pretrained(base)
    for key, value in shape.items():
        setattr(config, key, value)
    config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    torch.manual_seed(0)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(where):  # a 1.1B init takes seconds on a GPU, about a minute on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    marker.write_text(json.dumps(shape))
    return folder


class GpuMemory:
    """The most memory nvidia-smi shows in use on the GPU while a run goes, above the idle reading."""

    def __init__(self):
        self.idle = self.read()
        self.most = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def read() -> float | None:
        if shutil.which("nvidia-smi") is None:
            return None
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=False).stdout.strip()
        return float(out) if out.replace(".", "", 1).isdigit() else None

    def _sample(self):
        while not self._stop.wait(0.2):
            value = self.read()
            if value is not None and self.most is not None:
                self.most = max(self.most, value)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def used_mib(self) -> float | None:
        return None if self.idle is None or self.most is None else self.most - self.idle


def run_unsloth(variant: ts.Variant, spec: dict) -> dict:
    """Unsloth's recipe: its loader and LoRA (which patch the model), then TRL's trainer."""
    from unsloth import FastLanguageModel  # first: it patches transformers and TRL on import

    shape = ts.shape_of(spec)
    model, tokenizer = FastLanguageModel.from_pretrained(spec["model"], max_seq_length=shape.max_length,
                                                         dtype=torch.bfloat16, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(
        model, r=ts.LORA["r"], lora_alpha=ts.LORA["alpha"], lora_dropout=ts.LORA["dropout"], bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        random_state=ts.SEED)
    return ts.train_with_trl(variant, spec, model, tokenizer, None, torch.bfloat16,
                             ts.trl_rows_per_step(variant, spec))


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    if spec["variant"]["tool"] != "unsloth":
        return ts.child_main(spec_path)
    variant = ts.Variant(**spec["variant"])
    result = run_unsloth(variant, spec)
    result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def unsloth_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        return "Unsloth is not installed here"
    if not torch.cuda.is_available():
        return "Unsloth needs a CUDA GPU"
    return None


def run_one(variant: ts.Variant, spec: dict, work_dir: Path) -> tuple[ts.Row, float | None]:
    missing = unsloth_missing() if variant.tool == "unsloth" else None
    if missing:
        return ts.Row(variant, ok=False, error=missing), None
    with GpuMemory() as memory:
        row = ts.run_child(variant, spec, work_dir, script=Path(__file__).resolve())
    return row, memory.used_mib


def table(rows: list[tuple[ts.Row, float | None]], flops, peaks: dict) -> list[str]:
    lines = ["| run | settings | real tok/s | peak memory (MiB) | nvidia-smi peak (MiB) | final loss | MFU |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row, smi in rows:
        v = row.variant
        if not row.ok:
            lines.append(f"| {v.name} | {v.settings} | not run: {row.error.replace('|', '/')} | | | | |")
            continue
        mfu = ts.row_mfu(row, flops, peaks)
        lines.append(f"| {v.name} | {v.settings} | {ts._fmt(row.rate('tokens'))} | {ts._fmt(row.peak_bytes / 2**20)} "
                     f"| {ts._fmt(smi) if smi is not None else 'n/a'} | {ts._fmt(row.final_loss, 4)} "
                     f"| {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} |")
    return lines


def verdict(rows: list[tuple[ts.Row, float | None]]) -> list[str]:
    """tunesmith's default and its fused-loss rows against TRL's fastest LoRA setting (target: 1.5x
    the speed at 0.7x the memory) and Unsloth."""
    done = {row.variant.name: row for row, _ in rows if row.ok}
    trl = [r for name, r in done.items() if r.variant.tool == "trl" and r.variant.method == "lora"]
    ours = [done[n] for n in ("tunesmith", "tunesmith-liger", "tunesmith-cce") if n in done]
    if not trl or not ours:
        return ["- Ratios: need a tunesmith row and a TRL LoRA row."]
    fastest = max(trl, key=lambda r: r.rate("tokens"))
    lines = []
    for row in ours:
        lines.append(f"- {row.variant.name} / TRL's fastest ({fastest.variant.name}): speed "
                     f"**{row.rate('tokens') / fastest.rate('tokens'):.2f}x**, max allocated memory "
                     f"**{row.peak_bytes / fastest.peak_bytes:.2f}x** (target: at least 1.5x at most 0.7x)")
        if "unsloth" in done:
            lines.append(f"  - against Unsloth: speed {row.rate('tokens') / done['unsloth'].rate('tokens'):.2f}x, "
                         f"memory {row.peak_bytes / done['unsloth'].peak_bytes:.2f}x")
    return lines


def versions() -> str:
    from importlib import metadata

    found = []
    for name in ("torch", "transformers", "peft", "trl", "liger-kernel", "cut-cross-entropy", "flash-attn",
                 "bitsandbytes", "unsloth"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def machine(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({ts.cpu_model()}): no GPU, so these figures say nothing about speed"
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    return f"{torch.cuda.get_device_name(device)}, driver {driver}, CUDA {torch.version.cuda}"


def run_length(args, length: int, model_dir: Path, peaks: dict, device: torch.device) -> list[str]:
    shape = shape_for(length, args.tiny)
    work_dir = args.work_dir / shape.name
    work_dir.mkdir(parents=True, exist_ok=True)
    total_steps = (args.steps or shape.steps) + 1
    data_args = argparse.Namespace(rows=shape.batch * total_steps, seed=ts.SEED)
    data_path, tokens_path, facts = ts.prepare_data(data_args, work_dir, total_steps, shape, str(model_dir))
    flops = ts.flop_model(ts.tunesmith_config(data_path, work_dir / "prepared", total_steps, None, shape,
                                              str(model_dir)))
    from tunesmith.train.kernels import have_flash

    spec = {"data": str(data_path), "tokens": str(tokens_path), "total_steps": total_steps, "shape": shape.name,
            "shape_spec": shape.__dict__, "model": str(model_dir),
            "trl_attention": "flash_attention_2" if have_flash() else "sdpa"}
    rows = []
    for variant in args.variants:
        if variant.name in QLORA_ROWS and length != args.lengths[0]:
            continue
        print(f"[{shape.name}] {variant.name} ...", file=sys.stderr, flush=True)
        row, smi = run_one(variant, spec, work_dir)
        print(f"  {'ok' if row.ok else row.error}  ({row.wall_seconds:.0f} s)", file=sys.stderr, flush=True)
        print(f"[{shape.name}] {table([(row, smi)], flops, peaks)[-1]}", flush=True)  # kept if the run is cut short
        rows.append((row, smi))  # the peaks are measured once (10 s a time: the GPU's clocks hold steady)
    return [(f"### Sequence length {length}: {shape.batch} rows per step, {facts['used_tokens']:,} tokens in "
            f"{total_steps} steps (step 1 a warm-up), TRL attention {spec['trl_attention']}"), "",
            *table(rows, flops, peaks), "", *verdict(rows), ""]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,2048", help="sequence lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; --tiny 3)")
    parser.add_argument("--runs", default="core", help="core | all | names: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short rows: runs on a CPU")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "gpu_speed")
    parser.add_argument("--base", type=Path, default=None,
                        help="folder with SmolLM2's config and tokenizer (default: the embedded model's)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="print the table only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    by_name = {v.name: v for v in VARIANTS}
    names = [v.name for v in VARIANTS if args.runs == "all" or v.core] if args.runs in ("core", "all") \
        else args.runs.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(by_name)}")
    args.variants = [by_name[n] for n in names]
    if args.tiny:  # short rows whatever --lengths says (the chat template alone is about 30 tokens)
        args.lengths = [128 * (i + 1) for i in range(len(args.lengths))]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    device = pick_device("auto")
    model_dir = build_model(args.work_dir / ("model-tiny" if args.tiny else "model"), args.tiny, args.base)
    peaks = {} if args.tiny else ts.measure_peaks(device)  # --tiny's figures mean nothing: no 10 s of matmuls
    sections = []
    for length in args.lengths:  # each length's table printed as soon as it is done (a run may be cut short)
        sections.append(run_length(args, length, model_dir, peaks, device))
        print("\n".join(sections[-1]), flush=True)
    peak = peaks.get("bfloat16", peaks.get("float32", float("nan")))
    header = ["## Training on one GPU: tunesmith vs TRL and Unsloth (bench/gpu_speed.py)", "",
             f"- Machine: {machine(device)}", f"- Software: {versions()}",
             f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
             f"- Command: `python {' '.join(['bench/gpu_speed.py', *argv])}`",
             (f"- Model: {'tiny 2-layer' if args.tiny else 'SmolLM2-1.7B layer shape, 16 layers (about 1.1B)'}, "
             "random weights, bf16; LoRA r=16 alpha 32 on every linear layer; AdamW 2e-4 constant"),
             (f"- bf16 matmul peak measured here: {peak / 1e12:,.1f} TFLOP/s (MFU is against it)" if peaks
              else "- No matmul peak measured (--tiny), so no MFU"),
             ("- Peak memory: torch.cuda.max_memory_allocated in the run's process (peak RSS on a CPU); "
             "nvidia-smi: the most in use on the GPU during the run above the idle reading"), "",
    ]
    print("\n".join(header))  # the tables were printed above, each as its length finished
    lines = header + [line for section in sections for line in section]
    if not args.no_results:
        from results_md import write_section

        write_section(args.results, RESULTS_SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
