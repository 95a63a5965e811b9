"""The training loop, top to bottom.

One optimizer step = batch_size examples = accumulation_steps packed micro batches. The loss
of every micro batch is its summed cross-entropy divided by the supervised-token count of the
whole step, so gradients do not depend on how the step is split into micro batches.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tunesmith.config import RunConfig
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.errors import TunesmithError
from tunesmith.log import say
from tunesmith.train import checkpoint, distributed
from tunesmith.train.attention import packed_attention
from tunesmith.train.batching import PackedBatch, StepPlan, pack
from tunesmith.train.distributed import Group
from tunesmith.train.flops import FlopModel, cached_peak_flops
from tunesmith.train.loss import loss_sum, unwrap
from tunesmith.train.metrics import MetricsLog
from tunesmith.train.optim import build_optimizer, lr_at


@dataclass
class Window:
    """What happened since the last log line: summed on the host, no device syncs per step."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0
    targets: int = 0
    flops: float = 0.0
    loss_sum: torch.Tensor | float = 0.0

    def add(self, batches: list[PackedBatch], step_loss: torch.Tensor, flop_model: FlopModel) -> None:
        self.steps += 1
        for batch in batches:
            self.tokens += batch.n_tokens
            self.targets += batch.n_targets
            self.flops += flop_model.step_flops(batch.n_tokens, batch.n_targets,
                                                [end - start for start, end in batch.segments])
        self.loss_sum = self.loss_sum + step_loss

    def summary(self, peak_flops: float) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {"loss": float(self.loss_sum) / max(self.steps, 1),
                "tokens_per_second": self.tokens / seconds,
                "supervised_tokens_per_second": self.targets / seconds,
                "mfu": self.flops / seconds / peak_flops, "seconds": seconds, "tokens": self.tokens}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    tokens_per_second: float
    final_loss: float
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool


def train_step(model, batches: list[PackedBatch], autocast, chunk_size: int,
               n_targets: torch.Tensor | int | None = None) -> torch.Tensor:
    """Forward and backward over one step's micro batches; returns the step's mean loss (a tensor).
    n_targets: supervised tokens of the whole step (across all ranks); default: these batches'."""
    if n_targets is None:
        n_targets = sum(batch.n_targets for batch in batches)
    step_loss = torch.zeros((), device=batches[0].input_ids.device)
    for batch in batches:
        with packed_attention(unwrap(model)):  # backward too: checkpointed layers recompute inside it
            with autocast:
                summed = loss_sum(model, batch, chunk_size)
            (summed / n_targets).backward()
        step_loss += summed.detach() / n_targets
    return step_loss


@torch.no_grad()
def validation_loss(model, split: TokenizedSplit, config: RunConfig, autocast, device) -> float | None:
    """Mean loss per supervised token over the first eval_iters micro batches (a fixed subset)."""
    if len(split) == 0:
        return None
    model.eval()
    size = config.train.micro_batch_size
    total, targets = 0.0, 0
    for start in range(0, min(len(split), size * config.train.eval_iters), size):
        batch = pack(split, list(range(start, min(start + size, len(split))))).to(device)
        with autocast, packed_attention(unwrap(model)):
            total += float(loss_sum(model, batch, config.train.loss_chunk_size))
        targets += batch.n_targets
    model.train()
    return total / max(targets, 1)


@dataclass
class LoopState:
    """Everything besides weights, optimizer and RNG that an exact resume needs."""

    step: int = 0  # optimizer steps done (the data position is step * batch_size)
    best_val: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0
    bad_steps_in_row: int = 0
    skipped_steps: int = 0

    def to_dict(self, kind: str, **extra) -> dict:
        return {"kind": kind, **self.__dict__, **extra}

    @classmethod
    def from_dict(cls, state: dict) -> "LoopState":
        return cls(**{key: state[key] for key in cls.__dataclass_fields__ if key in state})


class Interrupted(TunesmithError):
    """SIGINT or SIGTERM: a checkpoint was saved at the end of the step; exit code 130."""

    exit_code = 130


class Diverged(TunesmithError):
    """Too many non-finite steps in a row; the last good checkpoint is untouched."""


@contextmanager
def stop_requests():
    """SIGINT / SIGTERM set a flag read at the end of each step; a second Ctrl-C stops at once."""
    request: dict = {"signal": None}

    def handler(signum, frame):
        if request["signal"] is not None:
            raise KeyboardInterrupt
        request["signal"] = signal.Signals(signum).name

    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(model, tokenizer, config: RunConfig, splits: dict[str, TokenizedSplit], device: torch.device,
        dtype: torch.dtype, resume_from: Path | None = None, group: Group = Group()) -> TrainResult:
    train_cfg, run_dir = config.train, config.run_dir
    plan = StepPlan.build(len(splits["train"]), train_cfg.batch_size, train_cfg.micro_batch_size,
                          train_cfg.epochs, train_cfg.max_steps, train_cfg.seed)
    if train_cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if train_cfg.compile:
        _compile_layers(model)
    sharded = train_cfg.strategy == "fsdp" and group.active
    if sharded:  # from here on `model` is the FSDP root: model and loss in one module
        model = distributed.shard(model, device)
    optimizer = build_optimizer(model, train_cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    flop_model, peak = FlopModel.of(model), cached_peak_flops(device, dtype)
    state = LoopState()
    if resume_from is not None:
        state = LoopState.from_dict(checkpoint.restore(resume_from, model, optimizer, group))
        say(f"Resuming from {resume_from} at step {state.step} of {plan.total_steps}")
    if not sharded:  # FSDP ranks each load the same weights, then keep only their shards
        group.broadcast_parameters(trainable)
    metrics = MetricsLog(run_dir / "metrics.jsonl", keep_through_step=state.step if resume_from else None) \
        if group.is_main else None
    scalars = _scalar_log(config, state.step if resume_from else None) if group.is_main else None
    ranks = f" x {group.world_size} processes ({'fsdp' if sharded else 'ddp'})" if group.active else ""
    say(f"Training {plan.total_steps} steps of {train_cfg.batch_size} examples "
        f"({config.accumulation_steps} micro batches of {train_cfg.micro_batch_size}) on {device}{ranks}, {dtype}")

    def save_step(kind_folder: Path, kind: str, **extra) -> None:
        snapshot = checkpoint.gather(model, optimizer if kind == "step" else None, group)  # every rank
        if group.is_main:  # one writer; the others wait until the folder is complete
            checkpoint.save(model, tokenizer, config, kind_folder, state.to_dict(kind, **extra), snapshot)
        group.barrier()

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(record)
        if scalars is not None:
            scalars.write(record)

    model.train()
    stopped_early, stats = False, None
    window, overall = Window(), Window()
    bar = tqdm(total=plan.total_steps, initial=state.step, desc="finetune", unit="step", dynamic_ncols=True,
               mininterval=0.5, disable=not group.is_main)
    with stop_requests() as stop:
        for step in range(state.step, plan.total_steps):
            lr = lr_at(step, plan.total_steps, train_cfg)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            mine = group.share(plan.step_indices(step))  # this rank's examples of the step
            batches = [pack(splits["train"], mine[i: i + train_cfg.micro_batch_size]).to(device)
                       for i in range(0, len(mine), train_cfg.micro_batch_size)]
            step_targets = group.sum(torch.tensor(sum(b.n_targets for b in batches), device=device))
            step_loss = group.sum(train_step(model, batches, autocast, train_cfg.loss_chunk_size, step_targets))
            if not sharded:  # FSDP has already summed each gradient into its owner's shard
                group.sum_gradients(trainable)
            grad_norm = distributed.full_value(
                torch.nn.utils.clip_grad_norm_(trainable, train_cfg.grad_clip or math.inf))
            if bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm)):  # one scalar sync per step
                optimizer.step()
                state.bad_steps_in_row = 0
            else:
                state.bad_steps_in_row += 1
                state.skipped_steps += 1
                _note(bar, f"step {step + 1}: loss or gradient is not finite; step skipped "
                          f"({state.bad_steps_in_row} in a row)")
            optimizer.zero_grad(set_to_none=True)
            state.step = done = step + 1
            if state.bad_steps_in_row >= train_cfg.max_bad_steps:
                _diverged(state, run_dir, train_cfg)
            if state.bad_steps_in_row == 0:
                window.add(batches, step_loss, flop_model)
                overall.add(batches, step_loss.detach(), flop_model)

            last = done == plan.total_steps
            if (done % train_cfg.log_interval == 0 or last) and window.steps:
                stats = window.summary(peak)
                log({"step": done, "epoch": round(plan.epoch_at(done), 4), "loss": stats["loss"],
                               "lr": lr, "grad_norm": float(grad_norm),
                               "tokens_per_second": stats["tokens_per_second"], "mfu": stats["mfu"],
                               "supervised_tokens_per_second": stats["supervised_tokens_per_second"],
                               "skipped_steps": state.skipped_steps})
                bar.set_postfix_str(f"loss {stats['loss']:.4f} lr {lr:.1e} "
                                    f"{stats['tokens_per_second']:.0f} tok/s mfu {100 * stats['mfu']:.1f}%")
                window = Window()

            if (train_cfg.eval_interval and done % train_cfg.eval_interval == 0) or last:
                eval_started = time.perf_counter()
                val = validation_loss(model, splits["val"], config, autocast, device)
                if val is not None:
                    log({"step": done, "val_loss": val})
                    _note(bar, f"step {done}: validation loss {val:.4f}")
                    if state.best_val is None or val < state.best_val:
                        state.best_val, state.best_step, state.evals_without_gain = val, done, 0
                        save_step(run_dir / "best", "best", val_loss=val)
                    else:
                        state.evals_without_gain += 1
                    patience = train_cfg.early_stopping_patience
                    if patience and state.evals_without_gain >= patience and not last:
                        _note(bar, f"Early stopping at step {done}: no improvement for {patience} validation "
                                  f"passes; best was {state.best_val:.4f} at step {state.best_step}")
                        stopped_early = True
                paused = time.perf_counter() - eval_started  # throughput counts training time only
                window.started += paused
                overall.started += paused
            if stop["signal"] and not last:
                folder = run_dir / f"step-{done:06d}"
                save_step(folder, "step")
                raise Interrupted(f"{stop['signal']} at step {done}: saved {folder}. Resume with: "
                                  f"tunesmith finetune {run_dir / 'config.yaml'} --resume")
            if train_cfg.save_interval and done % train_cfg.save_interval == 0 and not last:
                save_step(run_dir / f"step-{done:06d}", "step")
                if group.is_main:
                    checkpoint.prune(run_dir, train_cfg.save_total_limit)
            bar.update(1)
            if stopped_early:
                break
    bar.close()
    if metrics is not None:
        metrics.close()
    if scalars is not None:
        scalars.close()

    totals = overall.summary(peak)
    save_step(run_dir / "final", "final", train_loss=totals["loss"], best_val_loss=state.best_val)
    final_loss = stats["loss"] if stats else totals["loss"]
    return TrainResult(state.step, totals["seconds"], totals["tokens"], totals["tokens_per_second"],
                       final_loss, state.best_val, state.best_step, stopped_early)


def _scalar_log(config: RunConfig, resume_step: int | None):
    """TensorBoard scalars beside metrics.jsonl when train.tensorboard is on (metrics.jsonl always)."""
    if not config.train.tensorboard:
        return None
    from tunesmith.train.tensorboard import ScalarLog

    return ScalarLog(config.run_dir / "tensorboard", resume_step)


def _note(bar, message: str) -> None:
    """A line above the progress bar, on stderr with the other messages (tqdm.write defaults to stdout)."""
    bar.write(message, file=sys.stderr)


def _diverged(state: LoopState, run_dir: Path, train_cfg) -> None:
    good = [p for p in checkpoint.step_folders(run_dir) if checkpoint.is_complete(p)]
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written"
    raise Diverged(f"the loss or gradient was not finite for {state.bad_steps_in_row} steps in a row "
                   f"(through step {state.step}); stopped, {where}. Lower train.learning_rate "
                   f"(now {train_cfg.learning_rate:g}) or check the data")


def _enable_gradient_checkpointing(model) -> None:
    hf_model = unwrap(model)
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _compile_layers(model) -> None:
    """Compile each repeated block once, with dynamic sequence lengths (packed rows vary)."""
    for layer in distributed.transformer_layers(unwrap(model)):
        layer.compile(dynamic=True)


def describe(result: TrainResult, run_dir: Path) -> list[str]:
    lines = [f"Trained {result.steps} steps in {result.seconds:.0f} s "
             f"({result.tokens_per_second:.0f} tokens/s); final training loss {result.final_loss:.4f}"]
    if result.best_step is not None:
        lines.append(f"Best validation loss {result.best_val_loss:.4f} at step {result.best_step} "
                     f"(saved in {run_dir / 'best'})")
    if result.stopped_early:
        lines.append("Stopped early: validation loss stopped improving")
    return lines
