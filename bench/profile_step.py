"""Where a tunesmith training step goes, for one workload shape: torch's profiler over a few steps.

    .venv/bin/python bench/profile_step.py [--shape short|mixed|long] [--steps 3] [--precision fp32]

The same work as bench/train_speed.py (SmolLM2-135M-Instruct, LoRA r=16 on every linear layer,
the shape's rows and batch), run through tunesmith's own step (packing, the packed attention, the
chunked loss, AdamW) after one warm-up step. Prints the wall time of each phase (forward+backward,
optimizer) and the operators by self CPU time, grouped by what they are for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from train_speed import (  # bench/ is on the path
    MODEL,
    SEED,
    SHAPES,
    flop_model,
    prepare_data,
    step_plan,
    tunesmith_config,
)

from tunesmith.data.dataset import TokenizedSplit
from tunesmith.device import pick_dtype
from tunesmith.model.adapters import prepare_for_training
from tunesmith.model.fused_lora import use_fused_lora
from tunesmith.model.load import load_model, resolve
from tunesmith.train import loss as _loss
from tunesmith.train.batching import pack
from tunesmith.train.flops import cached_peak_flops
from tunesmith.train.loss import PackedLoss
from tunesmith.train.objective import train_step
from tunesmith.train.optim import build_optimizer

REAL_FUSED_APPLIES = _loss._fused_applies  # what --ab-of loss switches back on

# Operator name -> what it is for. First match wins; the rest is "other".
GROUPS = [
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("attention", ("_scaled_dot_product", "_flash_attention", "scaled_dot_product")),
    ("dropout / random", ("bernoulli", "dropout", "rand")),
    ("loss (softmax, cross-entropy)", ("log_softmax", "nll_loss", "cross_entropy", "_softmax")),
    ("copies and layout", ("copy_", "contiguous", "cat", "clone", "to", "_to_copy", "index", "gather",
                           "split", "transpose", "view", "reshape", "slice", "select", "unsqueeze",
                           "expand", "empty", "zeros", "fill_", "zero_", "as_strided", "t", "permute")),
    ("optimizer", ("_fused_adamw", "adamw", "_foreach")),
    ("elementwise", ("mul", "add", "silu", "sigmoid", "pow", "mean", "rsqrt", "neg", "div", "sum", "sub",
                     "exp", "where", "embedding", "cos", "sin", "threshold", "tanh", "masked")),
]


def group_of(name: str) -> str:
    bare = name.removeprefix("aten::").split(".")[0]
    for group, names in GROUPS:
        if any(bare == n or bare.startswith(n + "_") or (len(n) > 4 and n in bare) for n in names):
            return group
    return "other"


def switch(part: str, model, on: bool) -> None:
    """One of tunesmith's step optimisations on or off: lora (the fused LoRA layer) or loss (the
    fused output-layer cross-entropy)."""
    from tunesmith.train import loss

    if part == "lora":
        use_fused_lora(model, on)
    else:
        loss._fused_applies = REAL_FUSED_APPLIES if on else (lambda *args: False)


def interleaved(args, model, one_step, total: int) -> int:
    """The same steps with one optimisation on and off, alternating (A B B A ...), so that the
    machine's drift hits both alike; prints each side's median time."""
    times = {"on": [], "off": []}
    for round_ in range(args.ab):
        for side in (["on", "off"] if round_ % 2 == 0 else ["off", "on"]):
            switch(args.ab_of, model, side == "on")
            times[side].append(sum(sum(one_step(step)[:2]) for step in range(1, total)))
    for side, values in times.items():
        print(f"{args.ab_of} {side:>3}: median {statistics.median(values):.3f} s per {args.steps} steps "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    print(f"{args.ab_of}: on / off time {statistics.median(times['on']) / statistics.median(times['off']):.3f}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="short")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after one warm-up step")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--peft-forward", action="store_true",
                        help="PEFT's own LoRA forward instead of tunesmith's fused one (to compare)")
    parser.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                        help="no profiler: time the steps with --ab-of on and off in alternation, ROUNDS rounds")
    parser.add_argument("--ab-of", choices=["lora", "loss"], default="lora",
                        help="the optimisation --ab switches: lora (fused LoRA layer vs PEFT's) or loss (fused "
                             "output-layer cross-entropy vs checkpointed chunks)")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="train.loss_chunk_size")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (the bench uses 0)")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    total = args.steps + 1
    work = argparse.Namespace(rows=shape.batch * total, seed=SEED, shape=args.shape, steps=args.steps)

    work_dir = Path(__file__).resolve().parent / "_work" / f"profile_{args.shape}"
    work_dir.mkdir(parents=True, exist_ok=True)
    data_path, _, facts = prepare_data(work, work_dir, total)
    config = tunesmith_config(data_path, work_dir / "prepared", total, None, shape)
    split = TokenizedSplit.load(work_dir / "prepared" / "data" / "train")
    plan = step_plan(split, total, shape)
    dtype = pick_dtype(args.precision, torch.device("cpu"))
    config = config.model_copy(update={"lora": config.lora.model_copy(update={"dropout": args.lora_dropout}),
                                       "train": config.train.model_copy(update={"loss_chunk_size": args.loss_chunk})})
    model = prepare_for_training(load_model(resolve(MODEL)), config, dtype)
    use_fused_lora(model, not args.peft_forward)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    wrapped = PackedLoss(model)
    optimizer = build_optimizer(wrapped, config.train)
    flops = flop_model(config)

    def one_step(step: int) -> tuple[float, float, dict]:
        indices = plan.step_indices(step)
        batch = pack(split, indices)
        started = time.perf_counter()
        train_step(wrapped, [batch], autocast, config.train.loss_chunk_size)
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lengths = [int(split.lengths[i]) for i in indices]
        work = {"tokens": sum(lengths), "targets": int(batch.n_targets), "lengths": lengths}
        return middle - started, time.perf_counter() - middle, work

    one_step(0)
    if args.ab:
        return interleaved(args, model, one_step, total)
    phases = defaultdict(float)
    useful = 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as profiler:
        for step in range(1, total):
            forward_backward, optimizer_seconds, work = one_step(step)
            phases["forward + backward"] += forward_backward
            phases["optimizer"] += optimizer_seconds
            useful += flops.step_flops(work["tokens"], work["targets"], work["lengths"])
    seconds = sum(phases.values())
    peak = cached_peak_flops(torch.device("cpu"), dtype)
    print(f"shape {args.shape}: {facts['rows']} rows, length {facts['length']}, {shape.batch} per step, "
          f"{dtype}; {args.steps} steps in {seconds:.2f} s (profiler on), MFU {100 * useful / seconds / peak:.1f}% "
          f"of {peak / 1e9:.0f} GFLOP/s")
    for name, value in phases.items():
        print(f"  {name:<22} {value / args.steps * 1000:8.1f} ms/step")
    averages = profiler.key_averages()
    by_group = defaultdict(float)
    for event in averages:
        by_group[group_of(event.key)] += event.self_cpu_time_total
    total_us = sum(by_group.values())
    print("\nself CPU time by purpose:")
    for name, value in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<32} {100 * value / total_us:5.1f}%  {value / 1e3 / args.steps:8.1f} ms/step")
    print(f"\ntop {args.top} operators by self CPU time:")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
