"""The learning-rate finder (`train.learning_rate: auto`, `tunesmith lr-find`): a short range test.

Starting from the run's initial weights, take `steps` optimizer steps on training batches with
the rate growing exponentially from `low` to `high`, and record the loss. The loss is smoothed
(an exponential moving average, bias-corrected) and the test stops early once the smoothed loss
is four times its best or not finite: the rate has become too high.

The pick, documented and printed: a tenth of the rate at which the smoothed loss was lowest
(past that point the steps are already too large to descend; ten times below it training is
fast and stable). Then the weights, the optimizer and the random state are put back exactly, so
the training that follows is the run it would be with that rate written in the config.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunesmith.train import distributed
from tunesmith.train.batching import StepPlan
from tunesmith.train.distributed import Group
from tunesmith.train.optim import build_optimizer

LOW, HIGH, STEPS = 1e-6, 1.0, 40
SMOOTHING = 0.7  # weight of the running average per step
DIVERGED = 4.0  # smoothed loss this many times its best: stop
PICK_DIVISOR = 10.0


@dataclass
class Finding:
    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    pick: float
    lowest_at: float  # the rate where the smoothed loss was lowest
    seconds: float
    stopped_early: bool

    def describe(self) -> str:
        stop = ", stopped when the loss blew up" if self.stopped_early else ""
        return (f"Learning-rate finder: {len(self.rates)} steps from {self.rates[0]:.0e} to {self.rates[-1]:.1e} "
                f"in {self.seconds:.0f} s{stop}; lowest smoothed loss at {self.lowest_at:.2e}, "
                f"picked {self.pick:.2e} (a tenth of it)")


def find(model, objective, train_cfg, steps: int = STEPS, low: float = LOW, high: float = HIGH,
         group: Group = Group()) -> Finding:
    """Run the range test on `model` and put everything back; the model is unchanged afterwards.
    Several ranks sum their gradients as in training, so every rank sees the same curve and pick."""
    started = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    rng = torch.get_rng_state()
    optimizer = build_optimizer(model, train_cfg.model_copy(update={"learning_rate": low}))
    plan = StepPlan.build(objective.units("train"), train_cfg.batch_size, train_cfg.micro_batch_size,
                          1.0, steps, train_cfg.seed + 1)  # other batches than the run's first steps
    rates, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, False
    model.train()
    trainee = distributed.replicate(model) if group.active else model  # the training loop's DDP root
    try:
        for step in range(steps):
            rate = low * (high / low) ** (step / max(steps - 1, 1))
            loss = _step(trainee, trainable, objective, optimizer, group.share(plan.step_indices(step)), rate,
                         train_cfg)
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            value = average / (1 - SMOOTHING ** (step + 1))
            rates.append(rate)
            losses.append(loss)
            smoothed.append(value)
            best = min(best, value)
            if not math.isfinite(value) or value > DIVERGED * best:
                stopped = True
                break
    finally:
        with torch.no_grad():
            for parameter, value in zip(trainable, saved):
                parameter.copy_(value)
        torch.set_rng_state(rng)
    return _pick(rates, losses, smoothed, time.perf_counter() - started, stopped)


def _step(model, trainable, objective, optimizer, indices: list[int], rate: float, train_cfg) -> float:
    for param_group in optimizer.param_groups:
        param_group["lr"] = rate
    batches = [objective.batch("train", indices[i: i + train_cfg.micro_batch_size])
               for i in range(0, len(indices), train_cfg.micro_batch_size)]
    loss, _ = objective.step(model, batches)
    torch.nn.utils.clip_grad_norm_(trainable, train_cfg.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _pick(rates, losses, smoothed, seconds: float, stopped: bool) -> Finding:
    finite = [(value, rate) for value, rate in zip(smoothed, rates) if math.isfinite(value)]
    _, lowest_at = min(finite) if finite else (math.nan, rates[0])
    return Finding(rates, losses, smoothed, lowest_at / PICK_DIVISOR, lowest_at, seconds, stopped)


def save(finding: Finding, run_dir: Path) -> Path:
    """lr_find.json (reused on resume) and plots/lr_find.png; returns the plot's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "lr_find.json.tmp"
    tmp.write_text(json.dumps(asdict(finding), indent=2))
    tmp.replace(run_dir / "lr_find.json")
    from tunesmith import plots

    return plots.lr_find(finding, run_dir / "plots" / "lr_find.png")


def load(run_dir: Path) -> Finding | None:
    path = run_dir / "lr_find.json"
    try:
        return Finding(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
