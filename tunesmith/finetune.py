"""`tunesmith finetune CONFIG`: prepare the data (or reuse it), train, save, plot."""

from __future__ import annotations

import torch

from tunesmith import plots
from tunesmith.config import RunConfig, dump
from tunesmith.data.prepare import prepare, summary_lines
from tunesmith.data.templates import choose
from tunesmith.device import pick_device, pick_dtype
from tunesmith.log import say
from tunesmith.model.adapters import count_parameters, prepare_for_training
from tunesmith.model.load import load_model, load_tokenizer, resolve
from tunesmith.train import loop


def finetune(config: RunConfig) -> loop.TrainResult:
    run_dir = config.run_dir
    location = resolve(config.model)
    tokenizer = load_tokenizer(location)
    # Pin the template 'auto' chose, so checkpoints generate with exactly the training format.
    template = choose(config.data.template, tokenizer, config.data.system_prompt)
    config = config.model_copy(update={"data": config.data.model_copy(update={"template": template.spec})})
    prepared = prepare(config, tokenizer)  # first: a data error leaves no half-made run directory
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump(config))
    for line in summary_lines(prepared):
        say(line)

    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.precision, device)
    torch.manual_seed(config.train.seed)
    model = load_model(location, dtype=torch.float32, device=str(device))
    model = prepare_for_training(model, config, dtype)
    trainable, total = count_parameters(model)
    say(f"Model {config.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained ({config.method})")
    result = loop.run(model, tokenizer, config, prepared.splits, device, dtype)
    plots.curves(run_dir)
    return result


def main(config: RunConfig) -> int:
    result = finetune(config)
    for line in loop.describe(result, config.run_dir):
        print(line)
    print(f"Run directory: {config.run_dir}  (curves in {config.run_dir / 'plots'})")
    return 0
