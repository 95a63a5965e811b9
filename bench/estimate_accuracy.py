"""How close is `tunesmith estimate` to a real run? Estimate vs measured peak memory growth.

    .venv/bin/python bench/estimate_accuracy.py [--methods full,lora,qlora] [--steps 3]

For each method, a fresh process trains SmolLM2-135M-Instruct (the embedded model) for a few
steps with micro batch 4 x 256 tokens on this CPU in fp32 (LoRA r=16 on every linear, dropout
0.05, AdamW). Every example is cut at 256 tokens, so the step is the estimator's worst case
(it assumes full-length examples, every token supervised). The measured figure is the kernel's
peak resident set (VmHWM, reset through /proc/self/clear_refs once the data is prepared and the
libraries are imported) minus the resident set at that moment: everything the run itself added,
model loading included. The estimate is computed from the config alone, on the meta device.
Each method runs twice: with the default allocator (glibc keeps freed activation memory in its
heap for reuse, so the resident size also counts that) and with train.compact_memory (freed
memory goes straight back to the OS, tunesmith/train/memory.py); the estimate is made for each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "estimate_accuracy"
MICRO, LENGTH = 4, 256


def rows(count: int) -> list[dict]:
    filler = ("The quick brown fox jumps over the lazy dog while the committee reviews the quarterly "
              "figures, and every number is checked twice before anyone signs. ")
    return [{"question": f"Summarise report number {i}.", "answer": filler * 12} for i in range(count)]


def config_for(method: str, steps: int, compact: bool) -> dict:
    return {"model": "smollm2-135m", "method": method, "out_dir": str(WORK / method),
            "data": {"path": str(WORK / "data.jsonl"), "max_seq_length": LENGTH, "val_split": 0.05,
                     "test_split": 0.05},
            "train": {"max_steps": steps, "batch_size": MICRO, "micro_batch_size": MICRO, "warmup_steps": 0,
                      "learning_rate": 1e-4, "eval_interval": 0, "eval_iters": 1, "save_interval": 0,
                      "precision": "fp32", "device": "cpu", "log_interval": 1, "optimizer": "adamw",
                      "compact_memory": compact},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05}}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, steps: int, compact: bool) -> None:
    """One measured run; prints a JSON line."""
    import torch

    from tunesmith import estimate, finetune
    from tunesmith.config import build
    from tunesmith.data.prepare import prepare
    from tunesmith.model.load import load_tokenizer, resolve

    torch.set_num_threads(torch.get_num_threads())
    config = build(config_for(method, steps, compact))
    location = resolve(config.model)
    prepare(config, load_tokenizer(location, quiet=True))  # prepared (and cached) before the baseline
    predicted = estimate.estimate(config)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    baseline = rss_kib("VmRSS")
    finetune.finetune(config)
    peak = rss_kib("VmHWM")
    print(json.dumps({"method": method, "compact": compact, "measured": (peak - baseline) * 1024, "estimate": predicted.peak_bytes,
                      "components": predicted.memory}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--compact", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.compact)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(60)))
    results = []
    for method in args.methods.split(","):
        for compact in (False, True):
            command = [sys.executable, __file__, "--child", method, "--steps", str(args.steps)]
            process = subprocess.run(command + ["--compact"] * compact, capture_output=True, text=True, check=False)
            lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
            if process.returncode or not lines:
                print(process.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(lines[-1]))
    print(f"SmolLM2-135M, micro batch {MICRO} x {LENGTH} tokens, fp32 on CPU, AdamW, {args.steps} steps\n")
    print("| method | allocator | estimate (MiB) | measured peak RSS growth (MiB) | estimate / measured |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        allocator = "train.compact_memory" if r["compact"] else "default"
        print(f"| {r['method']} | {allocator} | {r['estimate'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | "
              f"{r['estimate'] / r['measured']:.2f} |")
    print("\nEstimated components (MiB):")
    for r in results:
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["components"].items())
        print(f"- {r['method']}{' (compact)' if r['compact'] else ''}: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
