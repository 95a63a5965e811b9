"""From data.path (and val_path / test_path) to cleaned train/val/test examples.

    read (sources.py) → examples (formats.py) → clean and deduplicate (clean.py)
      → seeded split, or fold i of k → leakage check: val/test rows that repeat a train row

Everything a user can get wrong raises here, before prepare writes anything. The reports
(rows per source, what cleaning removed, what leaked) go into the manifest and the doctor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunesmith.data import clean, dedup, sources
from tunesmith.data.formats import Example, detect_format
from tunesmith.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Loaded:
    examples: list[Example]
    format: str
    source: dict  # {"path", "kind", "rows"}
    cleaning: clean.Report


@dataclass
class Gathered:
    examples: dict[str, list[Example]]
    formats: dict[str, str]
    sources: dict[str, dict] = field(default_factory=dict)  # path / val_path / test_path → source
    cleaning: dict[str, dict] = field(default_factory=dict)  # same keys → cleaning report
    leakage: dict[str, dict] = field(default_factory=dict)  # val / test → what repeated train rows
    folds: dict | None = None  # {"k", "fold", "sizes"} under k-fold cross-validation

    @property
    def format(self) -> str:
        return self.formats["train"]


def load(path: str, data) -> Loaded:
    """One source, read, turned into examples and cleaned."""
    source = sources.read_source(path, data)
    fmt = detect_format(source.rows, str(path)) if data.format == "auto" else data.format
    report = clean.Report(rows_in=len(source.rows))
    examples = clean.to_examples(source.rows, fmt, data.clean.drop_empty, report)
    examples = clean.clean(examples, data.clean, report, fmt)
    report.rows_out = len(examples)
    if not examples:
        raise DataError(f"{path}: no rows left after cleaning ({_removed_summary(report)})")
    return Loaded(examples, fmt, {"path": str(path), "kind": source.kind, "rows": len(source.rows)}, report)


def _removed_summary(report: clean.Report) -> str:
    removed = [f"{count} {step.replace('_', ' ')}" for step, count in report.counts.items()
               if count and step not in ("whitespace", "prefixes")]
    return "removed: " + ", ".join(removed) if removed else "nothing was removed"


def gather(config) -> Gathered:
    data = config.data
    if not data.path:  # inspect reads the data without prepare's own check
        raise DataError("data.path is not set: give a data file or folder (e.g. --data.path train.jsonl)")
    if data.folds > 1 and data.fold == 0:
        raise DataError(f"data.folds={data.folds} runs every fold only in prepare and finetune; here pick one "
                        f"with data.fold (1..{data.folds}) or give its run directory <run>/fold-<i>")
    main = load(data.path, data)
    loaded = {"path": main}
    for key in ("val_path", "test_path"):
        if getattr(data, key):
            loaded[key] = load(getattr(data, key), data)
            if (loaded[key].format == "text") != (main.format == "text"):
                raise DataError(f"data.{key}: {loaded[key].format} rows, but data.path has {main.format} "
                                "rows; text (pre-training) and conversations cannot be mixed")
    examples, folds = _split(main.examples, data, loaded.get("val_path"), loaded.get("test_path"))
    gathered = Gathered(examples, {"train": main.format, "val": _format(loaded, "val_path", main),
                                   "test": _format(loaded, "test_path", main)},
                        sources={k: v.source for k, v in loaded.items()},
                        cleaning={k: v.cleaning.to_dict() for k, v in loaded.items()}, folds=folds)
    try:
        _check_leakage(gathered, data.clean)
    finally:
        dedup.forget_signatures()  # what deduplication remembered for the check, not for later
    return gathered


def _format(loaded: dict, key: str, main: Loaded) -> str:
    return loaded[key].format if key in loaded else main.format


def _split(main: list[Example], data, val: Loaded | None, test: Loaded | None
           ) -> tuple[dict[str, list[Example]], dict | None]:
    """Seeded, deterministic split; explicit val/test files replace the matching share."""
    order = list(range(len(main)))
    random.Random(data.seed).shuffle(order)
    test_size = 0 if test else _share(len(main), data.test_split)
    test_ids, rest = order[:test_size], order[test_size:]
    folds = None
    if data.folds > 1:
        val_ids, train_ids, folds = _fold(rest, data.folds, data.fold, data.path)
    else:
        val_size = 0 if val else _share(len(main), data.val_split)
        val_ids, train_ids = rest[:val_size], rest[val_size:]
    out = {"train": [main[i] for i in sorted(train_ids)],
           "val": val.examples if val else [main[i] for i in sorted(val_ids)],
           "test": test.examples if test else [main[i] for i in sorted(test_ids)]}
    if not out["train"]:
        raise DataError(f"{data.path}: {len(main)} rows leave none for training after the val/test split")
    return out, folds


def _share(total: int, share: float) -> int:
    size = round(total * share)
    return 1 if share > 0 and size == 0 and total >= 3 else size  # a requested split gets a row


def _fold(rows: list[int], k: int, fold: int, path) -> tuple[list[int], list[int], dict]:
    """Fold `fold` (1-based) of k contiguous parts of the shuffled rows: (val, train, description)."""
    if len(rows) < k:
        raise DataError(f"{path}: {len(rows)} rows (after the test split) cannot make data.folds={k} folds")
    base, extra = divmod(len(rows), k)
    sizes = [base + (1 if i < extra else 0) for i in range(k)]
    start = sum(sizes[: fold - 1])
    val = rows[start: start + sizes[fold - 1]]
    train = rows[:start] + rows[start + sizes[fold - 1]:]
    return val, train, {"k": k, "fold": fold, "sizes": sizes}


def _check_leakage(gathered: Gathered, settings) -> None:
    """Val/test rows that repeat a train row make evaluation flatter than the truth."""
    train = gathered.examples["train"]
    index = dedup.reference_index(train, settings.near_dup_threshold) if train else None
    for name in ("val", "test"):
        rows = gathered.examples[name]
        matches = dedup.overlaps(index, rows) if index is not None else []
        samples = [{"where": rows[m.index].where, "repeats": train[m.of].where, "kind": m.kind,
                    "similarity": round(m.similarity, 3), "text": clean.excerpt(rows[m.index].reference)}
                   for m in matches[:clean.SAMPLES_PER_STEP]]
        removed = settings.leakage == "remove" and bool(matches)
        gathered.leakage[name] = {"rows": len(rows), "leaked": len(matches),
                                  "exact": sum(m.kind == "exact" for m in matches),
                                  "near": sum(m.kind == "near" for m in matches),
                                  "removed": len(matches) if removed else 0, "samples": samples}
        if removed:
            leaked = {m.index for m in matches}
            gathered.examples[name] = [e for i, e in enumerate(rows) if i not in leaked]
