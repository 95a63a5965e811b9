"""TensorBoard scalars next to metrics.jsonl (train.tensorboard: true), written from the same
records: `tensorboard --logdir out/<run>/tensorboard`."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ConfigError

# metrics.jsonl key → TensorBoard tag
TAGS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/learning_rate",
        "tokens_per_second": "train/tokens_per_second", "grad_norm": "train/grad_norm"}


class ScalarLog:
    """Writes the known scalars of each metrics record at its step. On resume the events after
    the checkpoint's step are dropped (purge_step), as metrics.jsonl drops its records."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard needs the tensorboard package: "
                              "pip install 'tunesmith[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, tag in TAGS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] from the event files in `folder` (for tests and the report)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
