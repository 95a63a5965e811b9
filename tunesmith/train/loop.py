"""The training loop, top to bottom.

One optimizer step = batch_size units (examples, or preference pairs) = accumulation_steps packed
micro batches. What a step minimises is the objective's business (train/objective.py): the
supervised loss of every micro batch is its summed cross-entropy divided by the supervised-token
count of the whole step, so gradients do not depend on how the step is split into micro batches.

    run → _start (set up, restore) → _steps, per step: _optimizer_step → _log_window → _validate
        → _checkpoint_or_stop → _finish (final/ checkpoint, totals)
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
from tunesmith.errors import TunesmithError
from tunesmith.log import say
from tunesmith.train import checkpoint, distributed
from tunesmith.train.batching import StepPlan
from tunesmith.train.distributed import Group
from tunesmith.train.flops import FlopModel, cached_peak_flops
from tunesmith.train.loss import unwrap
from tunesmith.train.metrics import MetricsLog
from tunesmith.train.objective import train_step  # noqa: F401  (tests and benches import it from here)
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
    extra_sums: dict = field(default_factory=dict)  # the objective's own figures (rewards, accuracy)

    def add(self, batches: list, step_loss: torch.Tensor, flop_model: FlopModel, extra: dict | None = None) -> None:
        self.steps += 1
        for batch in batches:
            self.tokens += batch.n_tokens  # the examples' tokens, a shared beginning counted in each
            self.targets += batch.n_targets
            self.flops += flop_model.step_flops(batch.n_computed, batch.n_targets,  # the work done
                                                [end - start for start, end in batch.segments],
                                                batch.context_lengths)
        self.loss_sum = self.loss_sum + step_loss
        for key, value in (extra or {}).items():
            self.extra_sums[key] = self.extra_sums.get(key, 0.0) + value

    def summary(self, peak_flops: float) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        steps = max(self.steps, 1)
        return {"loss": float(self.loss_sum) / steps, "tokens_per_second": self.tokens / seconds,
                "supervised_tokens_per_second": self.targets / seconds,
                "mfu": self.flops / seconds / peak_flops, "seconds": seconds, "tokens": self.tokens,
                **{key: float(value) / steps for key, value in self.extra_sums.items()}}


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
    finder_seconds: float = 0.0  # learning_rate auto: the range test before training


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


REPEAT_WINDOW = 3.0  # seconds: under torchrun a Ctrl-C reaches a rank twice (from the terminal, and
# forwarded by the launcher); a repeat this soon after the first is the same request, not "stop at once"


@contextmanager
def stop_requests(repeat_window: float = 0.0):
    """SIGINT / SIGTERM set a flag read at the end of each step; a second one, later than
    repeat_window seconds after the first, stops at once."""
    request: dict = {"signal": None, "at": 0.0}

    def handler(signum, frame):
        if request["signal"] is None:
            request["signal"], request["at"] = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - request["at"] > repeat_window:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Run:
    """What the parts of one training run share: the model and its optimizer, the objective, the
    step plan, the progress so far, and where figures and checkpoints go."""

    model: torch.nn.Module
    tokenizer: object
    config: RunConfig
    objective: object  # train/objective.py's interface
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    group: Group
    sharded: bool
    state: LoopState
    metrics: MetricsLog | None
    scalars: object | None
    trainable: list[torch.nn.Parameter] = field(default_factory=list)  # after sharding: what the optimizer steps
    bar: tqdm | None = None

    def log(self, record: dict) -> None:
        for sink in (self.metrics, self.scalars):
            if sink is not None:
                sink.write(record)

    def save(self, folder: Path, kind: str, **extra) -> None:
        snapshot = checkpoint.gather(self.model, self.optimizer if kind == "step" else None, self.group)  # every rank
        if self.group.is_main:  # one writer; the others wait until the folder is complete
            checkpoint.save(self.model, self.tokenizer, self.config, folder, self.state.to_dict(kind, **extra),
                            snapshot)
        self.group.barrier()


def run(model, tokenizer, config: RunConfig, objective, device: torch.device, dtype: torch.dtype,
        resume_from: Path | None = None, group: Group = Group()) -> TrainResult:
    # from the start: a signal while the run sets up is acted on after its first step
    with stop_requests(REPEAT_WINDOW if group.active else 0.0) as stop:
        train_cfg = config.train
        session = _start(model, tokenizer, config, objective, device, resume_from, group)
        say(f"Training {session.plan.total_steps} steps of {train_cfg.batch_size} {_unit_name(config)} "
            f"({config.accumulation_steps} micro batches of {train_cfg.micro_batch_size}) on {device}"
            f"{_ranks(session)}, {dtype}")
        session.model.train()
        session.bar = tqdm(total=session.plan.total_steps, initial=session.state.step, desc="finetune", unit="step",
                           dynamic_ncols=True, mininterval=0.5, disable=not group.is_main)
        totals, stats, stopped_early = _steps(session, stop, device, cached_peak_flops(device, dtype))
    return _finish(session, totals, stats, stopped_early)


def _steps(session: Run, stop: dict, device, peak: float) -> tuple[dict, dict | None, bool]:
    """The optimizer steps, each followed by its log line, validation and checkpoint when due.
    Returns the whole run's figures, the last log window's, and whether it stopped early."""
    plan, state, train_cfg, group = session.plan, session.state, session.config.train, session.group
    flop_model = FlopModel.of(session.model)
    stopped_early, stats = False, None
    window, overall = Window(), Window()
    for step in range(state.step, plan.total_steps):
        lr = lr_at(step, plan.total_steps, train_cfg)
        batches, step_loss, extra, grad_norm = _optimizer_step(session, step, lr)
        done, last = state.step, state.step == plan.total_steps
        if state.bad_steps_in_row == 0:
            window.add(batches, step_loss, flop_model, extra)
            overall.add(batches, step_loss.detach(), flop_model, extra)
        if (done % train_cfg.log_interval == 0 or last) and window.steps:
            stats = window.summary(peak)
            _log_window(session, stats, lr, grad_norm)
            window = Window()
        if (train_cfg.eval_interval and done % train_cfg.eval_interval == 0) or last:
            eval_started = time.perf_counter()
            stopped_early = _validate(session, last)
            paused = time.perf_counter() - eval_started  # throughput counts training time only
            window.started += paused
            overall.started += paused
        _checkpoint_or_stop(session, distributed.agreed_signal(group, stop["signal"], device), last)
        session.bar.update(1)
        if stopped_early:
            break
    return overall.summary(peak), stats, stopped_early


def _start(model, tokenizer, config: RunConfig, objective, device, resume_from: Path | None, group: Group) -> Run:
    """Set the model up for training (checkpointing, compile, sharding), build the optimizer, restore
    a checkpoint, and open the metric logs."""
    train_cfg = config.train
    plan = StepPlan.build(objective.units("train"), train_cfg.batch_size, train_cfg.micro_batch_size,
                          train_cfg.epochs, train_cfg.max_steps, train_cfg.seed)
    if train_cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if train_cfg.compile:
        _compile_layers(model)
    sharded = train_cfg.strategy == "fsdp" and group.active
    if sharded:  # from here on `model` is the FSDP root: model and loss in one module
        model = distributed.shard(model, device)
    optimizer = build_optimizer(model, train_cfg)
    state = LoopState()
    if resume_from is not None:
        state = LoopState.from_dict(checkpoint.restore(resume_from, model, optimizer, group))
        say(f"Resuming from {resume_from} at step {state.step} of {plan.total_steps}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not sharded and group.active:  # FSDP ranks each load the same weights, then keep only their shards
        group.broadcast_parameters(trainable)
        model = distributed.replicate(model)  # from here on the DDP root: model and loss in one call
    kept = state.step if resume_from else None
    metrics = MetricsLog(config.run_dir / "metrics.jsonl", keep_through_step=kept) if group.is_main else None
    scalars = _scalar_log(config, kept) if group.is_main else None
    return Run(model, tokenizer, config, objective, optimizer, plan, group, sharded, state, metrics, scalars,
               trainable)


def _optimizer_step(session: Run, step: int, lr: float):
    """One optimizer step: this rank's micro batches forward and backward (gradients summed across
    ranks on the way), clipped, the update applied unless the loss or gradient is not finite."""
    train_cfg, state, group, optimizer = session.config.train, session.state, session.group, session.optimizer
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    mine = group.share(session.plan.step_indices(step))  # this rank's units of the step
    batches = [session.objective.batch("train", mine[i: i + train_cfg.micro_batch_size])
               for i in range(0, len(mine), train_cfg.micro_batch_size)]
    step_loss, extra = session.objective.step(session.model, batches)
    trainable = session.trainable  # gradients already summed across ranks (DDP, FSDP) during backward
    grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(trainable, train_cfg.grad_clip or math.inf))
    if bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm)):  # one scalar sync per step
        optimizer.step()
        state.bad_steps_in_row = 0
    else:
        state.bad_steps_in_row += 1
        state.skipped_steps += 1
        _note(session.bar, f"step {step + 1}: loss or gradient is not finite; step skipped "
                           f"({state.bad_steps_in_row} in a row)")
    optimizer.zero_grad(set_to_none=True)
    state.step = step + 1
    if state.bad_steps_in_row >= train_cfg.max_bad_steps:
        _diverged(state, session.config.run_dir, train_cfg)
    return batches, step_loss, extra, grad_norm


def _log_window(session: Run, stats: dict, lr: float, grad_norm: torch.Tensor) -> None:
    plan, done = session.plan, session.state.step
    extra = {key: value for key, value in stats.items()
             if key not in ("loss", "tokens_per_second", "supervised_tokens_per_second", "mfu", "seconds", "tokens")}
    session.log({"step": done, "epoch": round(plan.epoch_at(done), 4), "loss": stats["loss"], "lr": lr,
                 "grad_norm": float(grad_norm), "tokens_per_second": stats["tokens_per_second"],
                 "mfu": stats["mfu"], "supervised_tokens_per_second": stats["supervised_tokens_per_second"],
                 "skipped_steps": session.state.skipped_steps, **extra})
    accuracy = f" acc {100 * extra['reward_accuracy']:.0f}%" if "reward_accuracy" in extra else ""
    session.bar.set_postfix_str(f"loss {stats['loss']:.4f}{accuracy} lr {lr:.1e} "
                                f"{stats['tokens_per_second']:.0f} tok/s mfu {100 * stats['mfu']:.1f}%")


def _validate(session: Run, last: bool) -> bool:
    """A validation pass: log it, keep best/, count passes without gain; True to stop early."""
    state, train_cfg, done = session.state, session.config.train, session.state.step
    figures = session.objective.validate(session.model)
    if not figures:
        return False
    val = figures["val_loss"]
    session.log({"step": done, **figures})
    accuracy = f", preference accuracy {100 * figures['val_reward_accuracy']:.0f}%" \
        if "val_reward_accuracy" in figures else ""
    _note(session.bar, f"step {done}: validation loss {val:.4f}{accuracy}")
    if state.best_val is None or val < state.best_val:
        state.best_val, state.best_step, state.evals_without_gain = val, done, 0
        session.save(session.config.run_dir / "best", "best", val_loss=val)
    else:
        state.evals_without_gain += 1
    patience = train_cfg.early_stopping_patience
    if patience and state.evals_without_gain >= patience and not last:
        _note(session.bar, f"Early stopping at step {done}: no improvement for {patience} validation "
                           f"passes; best was {state.best_val:.4f} at step {state.best_step}")
        return True
    return False


def _checkpoint_or_stop(session: Run, stop_signal: str | None, last: bool) -> None:
    """After a stop request: save a resumable checkpoint and stop; else the periodic step checkpoint."""
    train_cfg, run_dir, done = session.config.train, session.config.run_dir, session.state.step
    if stop_signal and not last:
        folder = run_dir / f"step-{done:06d}"
        session.save(folder, "step")
        message = (f"{stop_signal} at step {done}: saved {folder}. Resume with: "
                   f"tunesmith finetune {run_dir / 'config.yaml'} --resume")
        raise Interrupted(message if session.group.is_main else "")
    if train_cfg.save_interval and done % train_cfg.save_interval == 0 and not last:
        session.save(run_dir / f"step-{done:06d}", "step")
        if session.group.is_main:
            checkpoint.prune(run_dir, train_cfg.save_total_limit)


def _finish(session: Run, totals: dict, stats: dict | None, stopped_early: bool) -> TrainResult:
    session.bar.close()
    for sink in (session.metrics, session.scalars):
        if sink is not None:
            sink.close()
    state = session.state
    session.save(session.config.run_dir / "final", "final", train_loss=totals["loss"], best_val_loss=state.best_val)
    final_loss = stats["loss"] if stats else totals["loss"]
    return TrainResult(state.step, totals["seconds"], totals["tokens"], totals["tokens_per_second"],
                       final_loss, state.best_val, state.best_step, stopped_early)


def _unit_name(config: RunConfig) -> str:
    return {"sft": "examples", "kto": "answers"}.get(config.objective, "pairs")


def _ranks(session: Run) -> str:
    group = session.group
    return f" x {group.world_size} processes ({'fsdp' if session.sharded else 'ddp'})" if group.active else ""


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
    finder = f" after a {result.finder_seconds:.0f} s learning-rate finder" if result.finder_seconds else ""
    lines = [f"Trained {result.steps} steps in {result.seconds:.0f} s{finder} "
             f"({result.tokens_per_second:.0f} tokens/s); final training loss {result.final_loss:.4f}"]
    if result.best_step is not None:
        lines.append(f"Best validation loss {result.best_val_loss:.4f} at step {result.best_step} "
                     f"(saved in {run_dir / 'best'})")
    if result.stopped_early:
        lines.append("Stopped early: validation loss stopped improving")
    return lines
