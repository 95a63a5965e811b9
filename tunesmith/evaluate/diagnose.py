"""Did training go well? A diagnosis of the learning curves in metrics.jsonl, in plain sentences
with the numbers behind them and what to change.

Verdicts, most serious first (a run gets one verdict; every finding is listed):
    diverged     the loss became NaN/inf (steps skipped) or ended above where it started
    lr_too_high  the training loss oscillates (large up-and-down swings instead of a descent) or
                 spiked well above where it started before coming back
    lr_too_low   the training loss barely moved over the whole run
    overfit      validation loss turned up while training loss kept falling
    underfit     training (or validation) loss is still falling steeply at the end
    well_fit     both curves flattened; the generalization gap is reported
    too_short    too few logged points to tell
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from tunesmith.train.metrics import read

VERDICTS = ("diverged", "lr_too_high", "lr_too_low", "overfit", "underfit", "well_fit", "too_short")
HEADLINES = {
    "diverged": "Training diverged (learning rate too high)",
    "lr_too_high": "Learning rate too high: the training loss oscillates or spikes",
    "lr_too_low": "Learning rate too low: the training loss barely moved (underfit)",
    "overfit": "Overfitting: validation loss turned up",
    "underfit": "Underfit: the loss was still falling steeply when training stopped",
    "well_fit": "Well fit: training and validation loss flattened",
    "too_short": "Too few logged points to diagnose",
}

# Thresholds, each a share of the loss level or of the run's total fall.
MIN_POINTS = 4  # logged training points needed for any shape judgement
BARELY_MOVED = 0.02  # total relative fall under 2%: not learning
JITTER = 0.15  # median step-to-step change over 15% of the loss scale (second half) ...
UP_SHARE = 0.4  # ... with at least 40% of the moves going up: oscillation
SPIKE = 1.5  # a logged loss 1.5x the first one: the steps overshoot
STILL_FALLING = 0.5  # end slope at least half the run's average slope: still falling steeply
VAL_RISE = 0.03  # validation loss 3% above its minimum ...
VAL_RISE_ONCE = 0.10  # ... for two passes after the minimum, or 10% on a single pass
BIG_GAP = 0.5  # validation loss over 1.5x the training loss: a wide generalization gap


@dataclass
class Diagnosis:
    verdict: str
    findings: list[str] = field(default_factory=list)  # plain sentences with the numbers
    advice: list[str] = field(default_factory=list)  # what to change, in config keys
    numbers: dict = field(default_factory=dict)

    @property
    def headline(self) -> str:
        return HEADLINES[self.verdict]

    def lines(self) -> list[str]:
        return [f"Diagnosis: {self.headline}.", *self.findings, *(f"Advice: {a}" for a in self.advice)]


def diagnose_run(run_dir: Path) -> Diagnosis:
    return diagnose(read(Path(run_dir) / "metrics.jsonl"))


def diagnose(records: list[dict]) -> Diagnosis:
    found = _diagnose_loss(records)
    if any("reward_accuracy" in r for r in records):
        from tunesmith.evaluate.diagnose_preference import preference_findings

        findings, advice = preference_findings(records)
        found.findings += findings
        found.advice += [a for a in advice if a not in found.advice]
    return found


def _diagnose_loss(records: list[dict]) -> Diagnosis:
    train = [(r["step"], float(r["loss"])) for r in records if "loss" in r and r["loss"] is not None]
    val = [(r["step"], float(r["val_loss"])) for r in records if r.get("val_loss") is not None]
    skipped = max((r.get("skipped_steps") or 0 for r in records), default=0)
    peak_lr = max((r["lr"] for r in records if r.get("lr") is not None), default=None)
    numbers = {"train_points": len(train), "val_points": len(val), "skipped_steps": skipped, "peak_lr": peak_lr}
    diverged = _divergence(train, val, skipped, peak_lr, numbers)
    if diverged:
        return diverged
    if len(train) < MIN_POINTS:
        return Diagnosis("too_short", [f"Only {len(train)} training loss points were logged."],
                         ["log more often (train.log_interval) or train longer (train.max_steps)"], numbers)
    losses = [loss for _, loss in train]
    level = max(1, len(losses) // 10)
    start, end = losses[0], _mean(losses[-level:])  # the end averaged: the last point alone is noisy
    numbers.update(start_loss=start, end_loss=end, steps=train[-1][0], fall=(start - end) / start if start else 0.0)
    for check in (_spike, _oscillation, _barely_moving):
        found = check(train, numbers)
        if found:
            return found
    return _fit(train, val, numbers)


def _divergence(train, val, skipped: int, peak_lr, numbers: dict) -> Diagnosis | None:
    rate = f" (peak learning rate {peak_lr:g})" if peak_lr else ""
    lower = f"lower train.learning_rate{f' to {peak_lr / 10:.2g}' if peak_lr else ' (e.g. 10x)'}"
    bad = [step for step, loss in train + val if not math.isfinite(loss)]
    if bad or skipped:
        where = f" first at step {bad[0]}" if bad else ""
        sentence = (f"The loss was not finite{where}; {skipped} step(s) were skipped because their loss or "
                    f"gradient was NaN or infinite{rate}.")
        return Diagnosis("diverged", [sentence], [lower + "; check the data for empty or broken rows"], numbers)
    if len(train) >= 2:
        start, lowest, last = train[0][1], min(loss for _, loss in train), train[-1][1]
        if last > start * 1.05 and last > lowest * 1.5:
            dipped = f" down to {lowest:.4f} and then" if lowest < 0.98 * start else ""
            sentence = (f"The training loss went from {start:.4f}{dipped} up to {last:.4f} at step {train[-1][0]}, "
                        f"above where it started{rate}.")
            return Diagnosis("diverged", [sentence], [lower], numbers)
    return None


def _oscillation(train, numbers: dict) -> Diagnosis | None:
    half = [loss for _, loss in train[len(train) // 2:]]
    moves = [b - a for a, b in pairwise(half)]
    if len(moves) < 3:
        return None
    # the scale: the loss level, or the run's whole fall when larger, so that small wiggles of a loss
    # that has converged near zero do not read as oscillation
    scale = max(_median(half), train[0][1] - min(loss for _, loss in train), 1e-12)
    jitter = _median([abs(m) for m in moves]) / scale
    up_share = sum(m > 0 for m in moves) / len(moves)
    numbers.update(jitter=jitter, up_share=up_share)
    if jitter < JITTER or up_share < UP_SHARE:
        return None
    sentence = (f"In the second half of training the loss swings by {jitter:.0%} of its scale from one "
                f"logged point to the next (median), and {up_share:.0%} of the moves go up: it oscillates "
                f"between {min(half):.4f} and {max(half):.4f} instead of descending.")
    peak = numbers.get("peak_lr")
    advice = f"lower train.learning_rate{f' to {peak / 3:.2g}' if peak else ' (e.g. 3x)'}, or raise train.batch_size"
    return Diagnosis("lr_too_high", [sentence], [advice], numbers)


def _spike(train, numbers: dict) -> Diagnosis | None:
    start = train[0][1]
    step, highest = max(train[1:], key=lambda point: point[1])
    numbers["highest_loss"] = highest
    if highest < SPIKE * start:
        return None
    sentence = (f"The training loss spiked to {highest:.4f} at step {step}, {highest / start:.1f}x its first value "
                f"{start:.4f}, before ending at {numbers['end_loss']:.4f}: the steps overshoot.")
    peak = numbers.get("peak_lr")
    advice = (f"lower train.learning_rate{f' to {peak / 3:.2g}' if peak else ' (e.g. 3x)'}, or warm up longer "
              "(train.warmup_steps)")
    return Diagnosis("lr_too_high", [sentence], [advice], numbers)


def _barely_moving(train, numbers: dict) -> Diagnosis | None:
    start, end, fall = numbers["start_loss"], numbers["end_loss"], numbers["fall"]
    if fall >= BARELY_MOVED or start < 0.1:  # a loss already near zero has nowhere to go
        return None
    sentence = (f"The training loss barely moved: {start:.4f} at the start, {end:.4f} at the end "
                f"({fall:.1%} lower) over {numbers['steps']} steps.")
    peak = numbers.get("peak_lr")
    advice = f"raise train.learning_rate{f' to {peak * 10:.2g}' if peak else ' (e.g. 10x)'} or train longer"
    return Diagnosis("lr_too_low", [sentence], [advice], numbers)


def _fit(train, val, numbers: dict) -> Diagnosis:
    ratio = _end_slope_ratio(train)
    numbers["end_slope_ratio"] = ratio
    start, end = numbers["start_loss"], numbers["end_loss"]
    train_sentence = (f"Training loss fell from {start:.4f} to {end:.4f} over {numbers['steps']} steps; over "
                      f"the last fifth it fell at {ratio:.0%} of the run's average rate.")
    overfit = _overfit(train, val, numbers)
    if overfit:
        overfit.findings.insert(0, train_sentence)
        return overfit
    val_falling = _val_still_falling(val, numbers)
    if ratio >= STILL_FALLING or val_falling:
        findings = [train_sentence + (" It is still falling steeply." if ratio >= STILL_FALLING else "")]
        if val_falling:
            findings.append(val_falling)
        advice = ["train longer (raise train.max_steps or train.epochs); the curve has not flattened yet"]
        return Diagnosis("underfit", findings, advice, numbers)
    findings = [train_sentence + " It has flattened."]
    advice = []
    if val:
        gap_sentence, wide = _gap(train, val, numbers)
        findings.append(gap_sentence)
        if wide:
            advice.append("the gap is wide: more data, a smaller lora.r, or more lora.dropout would narrow it")
    else:
        findings.append("No validation loss was logged (data.val_split is 0?), so overfitting cannot be ruled out.")
        advice.append("hold out validation rows (data.val_split 0.1) to see the generalization gap")
    return Diagnosis("well_fit", findings, advice, numbers)


def _overfit(train, val, numbers: dict) -> Diagnosis | None:
    if len(val) < 3:
        return None
    best_index = min(range(len(val)), key=lambda i: val[i][1])
    best_step, best = val[best_index]
    last_step, last = val[-1]
    after = len(val) - 1 - best_index
    rise = (last - best) / max(best, 1e-12)
    numbers.update(best_val_step=best_step, best_val_loss=best, last_val_loss=last, val_rise=rise)
    if after == 0 or rise < VAL_RISE or (after < 2 and rise < VAL_RISE_ONCE):
        return None
    train_at_best = _train_near(train, best_step)
    sentence = (f"Validation loss was lowest at step {best_step} ({best:.4f}) and rose to {last:.4f} by step "
                f"{last_step} (+{rise:.0%}), while training loss went from {train_at_best:.4f} to "
                f"{numbers['end_loss']:.4f}: the model is memorising the training rows.")
    advice = [(f"stop near step {best_step}: set train.max_steps {best_step}, or train.early_stopping_patience 2 "
               "(the best checkpoint is kept in best/); more data or a smaller learning rate also help")]
    return Diagnosis("overfit", [sentence], advice, numbers)


def _val_still_falling(val, numbers: dict) -> str | None:
    """The last validation interval fell by over 3% at no less than half the run's average rate."""
    if len(val) < 3:
        return None
    (first_step, first), (before_step, before), (last_step, last) = val[0], val[-2], val[-1]
    recent = (before - last) / max(before, 1e-12)
    average_rate = (first - last) / max(last_step - first_step, 1)
    end_rate = (before - last) / max(last_step - before_step, 1)
    numbers["val_recent_fall"] = recent
    if recent > VAL_RISE and average_rate > 0 and end_rate >= STILL_FALLING * average_rate:
        return (f"Validation loss was still falling at the end: {before:.4f} to {last:.4f} "
                f"({recent:.1%}) in the last validation interval, at step {last_step}.")
    return None


def _gap(train, val, numbers: dict) -> tuple[str, bool]:
    last_step, last_val = val[-1]
    train_loss = _train_near(train, last_step)
    gap = last_val - train_loss
    numbers.update(generalization_gap=gap, last_val_loss=last_val)
    wide = train_loss > 0 and gap > BIG_GAP * train_loss
    sentence = (f"Validation loss flattened at {last_val:.4f} against a training loss of {train_loss:.4f}: a "
                f"generalization gap of {gap:+.4f}{' (wide)' if wide else ''}.")
    return sentence, wide


def _end_slope_ratio(train) -> float:
    """Slope over the last fifth of the steps (least squares), as a share of the run's average slope."""
    last_step = train[-1][0]
    tail = [(s, loss) for s, loss in train if s >= 0.8 * last_step]
    if len(tail) < 3:
        tail = train[-3:]
    mean_slope = (train[0][1] - train[-1][1]) / max(train[-1][0] - train[0][0], 1)
    if mean_slope <= 0:
        return 0.0
    return max(0.0, -_slope(tail) / mean_slope)


def _slope(points) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = _mean(xs), _mean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread if spread else 0.0


def _train_near(train, step: int) -> float:
    return min(train, key=lambda point: abs(point[0] - step))[1]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _median(values) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
