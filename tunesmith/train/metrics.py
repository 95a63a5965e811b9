"""metrics.jsonl: one JSON object per logged step, appended and flushed as training goes."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """A fresh log, or on resume the old one cut back to the checkpoint's step, so the records
    of steps that will be redone are not duplicated."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        kept = [r for r in read(path) if r.get("step", 0) <= keep_through_step] if keep_through_step else []
        tmp = path.with_name(path.name + ".tmp")  # the kept history is never half-written
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        tmp.replace(path)
        self.handle = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
