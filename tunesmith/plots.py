"""PNG curves of a run: training and validation loss, learning rate, throughput."""

from __future__ import annotations

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
    return written


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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _single(train: list[dict], key: str, label: str, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.plot([r["step"] for r in train], [r.get(key) or 0 for r in train])
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
