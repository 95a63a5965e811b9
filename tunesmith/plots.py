"""PNG curves of a run: training and validation loss, learning rate, throughput."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tunesmith.train.metrics import read  # noqa: E402


def curves(run_dir: Path) -> list[Path]:
    records = read(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        return []
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_loss(train, val, out_dir / "loss.png"),
               _single(train, "lr", "learning rate", out_dir / "lr.png"),
               _single(train, "tokens_per_second", "tokens / s", out_dir / "throughput.png")]
    if any("reward_accuracy" in r for r in train):
        written.append(_preference(train, val, out_dir / "preference.png"))
    return written


def _preference(train: list[dict], val: list[dict], path: Path) -> Path:
    """Preference runs: accuracy and reward margin (left), the answers' mean token log-probs (right).
    Both log-probs falling together is the known DPO failure the diagnosis warns about."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    left.plot(steps, [r.get("reward_accuracy", 0) for r in train], label="accuracy (train)")
    if val:
        left.plot([r["step"] for r in val], [r.get("val_reward_accuracy", 0) for r in val], "o-",
                  label="accuracy (validation)")
    left.set_ylim(-0.02, 1.02)
    left.set_ylabel("preference accuracy")
    margin = left.twinx()
    margin.plot(steps, [r.get("reward_margin", 0) for r in train], color="tab:green", alpha=0.6, label="reward margin")
    margin.set_ylabel("reward margin (chosen - rejected)")
    left.legend(loc="lower right")
    margin.legend(loc="center right")
    right.plot(steps, [r.get("logp_chosen", 0) for r in train], label="chosen")
    right.plot(steps, [r.get("logp_rejected", 0) for r in train], label="rejected")
    right.set_ylabel("mean log-prob per answer token")
    right.legend()
    for axes in (left, right):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return _save(figure, path)


def _loss(train: list[dict], val: list[dict], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if val:
        axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        best = min(val, key=lambda r: r["val_loss"])
        axes.annotate(f"best {best['val_loss']:.3f}", (best["step"], best["val_loss"]),
                      textcoords="offset points", xytext=(0, 10), ha="center")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (per supervised token)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _single(train: list[dict], key: str, label: str, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.plot([r["step"] for r in train], [r.get(key) or 0 for r in train])
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def lr_find(finding, path: Path) -> Path:
    """The learning-rate range test (train/lr_find.py): loss against rate, the pick marked."""
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(finding.rates, finding.losses, alpha=0.35, label="loss")
    axes.plot(finding.rates, finding.smoothed, label="smoothed loss")
    axes.axvline(finding.pick, color="tab:green", linestyle="--", label=f"picked {finding.pick:.1e}")
    axes.axvline(finding.lowest_at, color="tab:gray", linestyle=":", label=f"lowest at {finding.lowest_at:.1e}")
    axes.set_xscale("log")
    finite = [v for v in finding.smoothed if math.isfinite(v)]
    if finite:
        axes.set_ylim(min(finite) * 0.95, min(max(finite), finite[0] * 1.5) * 1.05)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
