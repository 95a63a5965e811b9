"""On a CUDA machine: QLoRA with the paged optimizers, merge and GGUF export, and the estimator
against the measured peak of real runs. Not part of the test suite (CI has no GPU).

    python bench/cuda_methods.py --model-dir DIR_WITH_CONFIG_AND_TOKENIZER [--work DIR]

The estimator part builds a randomly initialised model from DIR's config.json (e.g. SmolLM2-135M's:
memory does not depend on the values of the weights), trains full / lora / qlora for 3 steps of
micro batch 4 x 256 tokens in bf16, and compares torch.cuda.max_memory_allocated with the estimate
(without its 'CUDA context' line, which the allocator does not see).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def paged_qlora(work: Path) -> None:
    import bitsandbytes as bnb
    import tiny

    from tunesmith.config import RunConfig, TrainConfig
    from tunesmith.data.dataset import TokenizedSplit
    from tunesmith.model.adapters import load_for_training, prepare_for_training
    from tunesmith.train.batching import pack
    from tunesmith.train.loop import train_step
    from tunesmith.train.optim import build_optimizer

    model_dir = tiny.make_model(work / "llama", "llama")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for name, kind in (("paged_adamw_8bit", bnb.optim.PagedAdamW8bit), ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit)):
        config = RunConfig.model_validate({"model": str(model_dir), "method": "qlora", "lora": {"dropout": 0.0}})
        model = prepare_for_training(load_for_training(model_dir, config, "cuda", torch.bfloat16), config,
                                     torch.bfloat16)
        layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        train = TrainConfig(learning_rate=1e-2, optimizer=name)
        optimizer = build_optimizer(model, train)
        generator = torch.Generator().manual_seed(7)
        ids = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (12, 9, 15)]
        split = TokenizedSplit.from_lists(ids, [[False] * 3 + [True] * (len(x) - 3) for x in ids])
        batch = pack(split, [0, 1, 2]).to(torch.device("cuda"))
        losses = []
        for _ in range(8):
            losses.append(float(train_step(model, [batch], autocast, 64)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        print(json.dumps({"check": "qlora+" + name, "optimizer": type(optimizer).__name__,
                          "is_paged": isinstance(optimizer, kind), "layer": type(layer).__name__,
                          "weight_dtype": str(layer.weight.dtype), "device": str(layer.weight.device),
                          "loss_first": losses[0], "loss_last": losses[-1]}))


def end_to_end(work: Path) -> None:
    from helpers import fast_train_flags, qa_rows, write_jsonl

    from tunesmith.cli import main

    data = write_jsonl(work / "d.jsonl", qa_rows(24))
    flags = [str(f) for f in fast_train_flags(max_steps=4)]
    flags[flags.index("cpu")] = "cuda"
    code = main(["finetune", "--model", str(work / "llama"), "--method", "qlora", "--data.path", str(data),
                 "--out_dir", str(work / "run"), "--train.optimizer", "paged_adamw_8bit",
                 "--train.learning_rate", "1e-2", *flags])
    merged = main(["merge", str(work / "run")])
    exported = main(["export", str(work / "run"), "--type", "q8_0"])
    print(json.dumps({"check": "cli qlora on cuda: finetune, merge, export", "codes": [code, merged, exported]}))


def measure(model_dir: Path, work: Path, method: str) -> dict:
    from tunesmith import estimate, finetune
    from tunesmith.config import build

    rows = [{"question": f"Summarise report {i}.", "answer": "The committee reviewed the figures twice. " * 60}
            for i in range(40)]
    (work / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = build({"model": str(model_dir), "method": method, "out_dir": str(work / f"est-{method}"),
                    "data": {"path": str(work / "long.jsonl"), "max_seq_length": 256},
                    "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0,
                              "eval_interval": 0, "eval_iters": 1, "save_interval": 0, "precision": "bf16",
                              "device": "cuda", "log_interval": 1},
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05}})
    predicted = estimate.estimate(config, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    finetune.finetune(config)
    measured = torch.cuda.max_memory_allocated() - before
    expected = predicted.peak_bytes - predicted.memory.get("CUDA context", 0)
    return {"check": f"estimate {method}", "estimate_mib": expected / 2**20, "measured_mib": measured / 2**20,
            "ratio": expected / measured, "components_mib": {k: v / 2**20 for k, v in predicted.memory.items()}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp()))
    parser.add_argument("--child")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    random_model = work / "random-model"
    if args.child:
        print(json.dumps(measure(random_model, work, args.child)))
        return 0
    paged_qlora(work)
    end_to_end(work)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir))
    model.save_pretrained(random_model)
    AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(random_model)
    for method in ("full", "lora", "qlora"):
        process = subprocess.run([sys.executable, __file__, "--model-dir", str(args.model_dir), "--work", str(work),
                                  "--child", method], capture_output=True, text=True, check=False)
        lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else process.stderr[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
