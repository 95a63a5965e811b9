"""`tunesmith lr-find CONFIG`: the learning-rate range test alone (train/lr_find.py), without training.

Prints the pick and the cost, writes <run>/lr_find.json and <run>/plots/lr_find.png. A run with
`train.learning_rate: auto` does the same before its first step.
"""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.finetune import make_objective, set_up
from tunesmith.train import distributed, lr_find


def main(config: RunConfig) -> int:
    run = set_up(config.model_copy(update={"resume": False}))
    try:
        objective = make_objective(run.model, run.config, run.prepared, run.device, run.dtype, run.group)
        finding = lr_find.find(run.model, objective, run.config.train, group=run.group)
    finally:
        distributed.stop(run.group)
    if run.group.is_main:
        plot = lr_find.save(finding, run.config.run_dir)
        print(finding.describe())
        print(f"Use it: --train.learning_rate {finding.pick:.2e}  (or train.learning_rate: auto)")
        print(f"Plot: {plot}")
    return 0
