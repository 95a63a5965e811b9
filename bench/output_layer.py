"""The linear layers of generation on a CPU: torch's multiply (the layer's own `F.linear`) against
tunesmith's oneDNN copies of the weights (tunesmith/infer/laid_out.py), side by side in one process.

1. The multiply alone, for the model's output weight, at the row counts a pass asks for (one per
   running row, a few more for newcomers; evaluate's scoring reads many): median of alternating
   repeats.
2. The engine's decode step with 1 and 8 running rows (the serve_load questions' kind of prompt),
   every layer's copy on and off, alternating: the greedy tokens must be the same both ways.
--dtype bf16 loads the model in bf16 (what precision auto serves where a bf16 matmul pays).

With --strided, instead: the multiply of the last column of each of N prompts (60 columns each) as
the view transformers' `logits_to_keep=1` slices (strided across rows) against the same rows side
by side, as the engine now asks for them (column indices), fp32 and bf16.

    .venv/bin/python bench/output_layer.py --model out/bench-export/merged [--dtype bf16] [--strided]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tunesmith.infer import laid_out
from tunesmith.infer.engine import Engine
from tunesmith.infer.request import Request, Sampling

ROWS = (1, 8, 33, 128, 512)


def timed(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def multiply_table(layer: torch.nn.Linear, rounds: int) -> list[str]:
    copy = laid_out.Copy(layer)
    lines = ["| rows | F.linear (MKL) ms | oneDNN copy ms | speed-up |", "|---:|---:|---:|---:|"]
    for rows in ROWS:
        hidden = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
        mkl, onednn = [], []
        for _ in range(rounds):
            mkl.append(timed(lambda x=hidden: F.linear(x, layer.weight, layer.bias)))
            onednn.append(timed(lambda x=hidden: torch.ops.mkldnn._linear_pointwise(x, copy.weight, layer.bias,
                                                                                    "none", [], "")))
        a, b = statistics.median(mkl), statistics.median(onednn)
        lines.append(f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    return lines


def strided_table(layer: torch.nn.Linear, rounds: int) -> list[str]:
    lines = ["| dtype | rows | strided view ms | side by side ms | slow-down |", "|---|---:|---:|---:|---:|"]
    for dtype in (torch.float32, torch.bfloat16):
        weight = layer.weight.detach().to(dtype)
        for rows in (8, 64, 240):
            hidden = torch.randn(rows, 60, layer.in_features, dtype=dtype)
            view, packed = hidden[:, -1:, :], hidden[:, torch.tensor([59]), :]
            strided, side = [], []
            for _ in range(rounds):
                strided.append(timed(lambda x=view, w=weight: F.linear(x, w), 2))
                side.append(timed(lambda x=packed, w=weight: F.linear(x, w), 2))
            a, b = statistics.median(strided), statistics.median(side)
            lines.append(f"| {str(dtype).replace('torch.', '')} | {rows} | {a:.1f} | {b:.1f} | {a / b:.1f}x |")
    return lines


def decode_steps(model, tokenizer, on: bool, rows: int = 8, steps: int = 25) -> tuple[float, list[list[int]]]:
    engine = Engine(model, tokenizer.pad_token_id)
    if not on:
        laid_out.drop(model)
    for i in range(rows):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Question {i}: what is {i} plus {3 * i}? "
                                               "Explain."}], tokenize=False, add_generation_prompt=True)
        engine.admit(Request(tokenizer.encode(text, add_special_tokens=False), Sampling(max_new_tokens=steps + 20)),
                     tokenizer, [])
    while engine.prefills or engine.pending:
        engine.step()
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps * 1000
    return elapsed, [row.request.completion_ids for row in engine.running.rows]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model directory (e.g. a run's merged/)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--strided", action="store_true", help="the kept columns as a strided view or side by side")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").eval()
    layer = model.get_output_embeddings()
    print(f"output weight {tuple(layer.weight.shape)} {args.dtype}, {torch.get_num_threads()} threads\n")
    if args.strided:
        with torch.inference_mode():
            print("\n".join(strided_table(layer, args.rounds)))
        return
    with torch.inference_mode():
        print("\n".join(multiply_table(layer, args.rounds)))
    for rows in (1, 8):
        print("\n".join(decode_lines(model, tokenizer, rows, args.rounds)))


def decode_lines(model, tokenizer, rows: int, rounds: int) -> list[str]:
    times: dict[bool, list[float]] = {True: [], False: []}
    answers: dict[bool, list] = {}
    for _ in range(rounds):
        for on in (True, False):
            ms, tokens = decode_steps(model, tokenizer, on, rows)
            times[on].append(ms)
            answers.setdefault(on, tokens)
    same = "the same greedy tokens" if answers[True] == answers[False] else "DIFFERENT tokens"
    lines = [f"\nengine decode step, {rows} running rows, {rounds} alternating rounds of 25 steps:"]
    for on, label in ((False, "torch's multiply"), (True, "oneDNN copies")):
        lines.append(f"- {label}: median {statistics.median(times[on]):.1f} ms "
                     f"({', '.join(f'{t:.0f}' for t in times[on])})")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    return [*lines, f"- step time copies/torch: {ratio:.2f}x; {same}"]


if __name__ == "__main__":
    main()
