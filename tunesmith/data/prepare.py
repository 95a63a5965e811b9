"""`tunesmith prepare`: raw rows → seeded train/val/test splits → tokens with masked labels.

The result lives in <run>/data/ with a manifest (source hash, tokenizer, template, counts).
It is reused when nothing that shapes it changed, and written atomically: a temporary folder
renamed into place, the manifest written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.dataset import TokenizedSplit, read_rows, write_rows
from tunesmith.data.formats import Example, load_examples
from tunesmith.data.templates import Encoder, Template, choose, pieces, prompt_text
from tunesmith.errors import DataError
from tunesmith.log import say

FORMAT_VERSION = 1  # bump when the prepared layout or tokenization changes
SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    folder: Path
    manifest: dict
    splits: dict[str, TokenizedSplit]

    def rows(self, split: str) -> list[dict]:
        return read_rows(self.folder / split)


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    text = json.dumps([sorted(vocab.items())[:: max(1, len(vocab) // 4096)], len(vocab),
                       tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key(config: RunConfig, tokenizer) -> dict:
    data = config.data
    for k in ("path", "val_path", "test_path"):
        if getattr(data, k) and not Path(getattr(data, k)).is_file():
            raise DataError(f"data.{k}: data file {getattr(data, k)} not found")
    sources = {k: file_hash(getattr(data, k)) for k in ("path", "val_path", "test_path") if getattr(data, k)}
    settings = data.model_dump(exclude={"path", "val_path", "test_path"})
    settings["template"] = choose(data.template, tokenizer, data.system_prompt).spec  # auto, resolved
    return {"version": FORMAT_VERSION, "sources": sources, "settings": settings,
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def prepare(config: RunConfig, tokenizer, *, force: bool = False) -> Prepared:
    if not config.data.path:
        raise DataError("data.path is not set: give a JSON or JSONL file (e.g. --data.path train.jsonl)")
    folder = config.run_dir / "data"
    key = _key(config, tokenizer)
    manifest_path = folder / "manifest.json"
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            say(f"Reusing prepared data in {folder} (sources and settings unchanged)")
            return Prepared(folder, manifest, {s: TokenizedSplit.load(folder / s) for s in SPLITS})
    return _build(config, tokenizer, folder, key)


def _build(config: RunConfig, tokenizer, folder: Path, key: dict) -> Prepared:
    data = config.data
    template = choose(data.template, tokenizer, data.system_prompt)
    examples, formats = split_examples(config)
    say(f"Data format: {', '.join(sorted(set(formats.values())))} "
        f"({'detected from the keys' if data.format == 'auto' else 'as configured'}); "
        f"template: {template.describe}")
    encoder = Encoder(tokenizer)
    tokenized = {name: tokenize(examples[name], template, encoder, tokenizer, data.max_seq_length,
                                data.mask_prompt) for name in SPLITS}
    counts = {name: stats for name, (_, _, stats) in tokenized.items()}
    splits = {name: split for name, (split, _, _) in tokenized.items()}
    total_kept = sum(c["examples"] for c in counts.values())
    if counts["train"]["examples"] == 0:
        _explain_empty(counts, data.max_seq_length)
    # Every user error is raised above, before anything is written.
    tmp = folder.with_name(f"data.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (split, rows, _) in tokenized.items():
        split.save(tmp / name)
        write_rows(tmp / name, rows)
    manifest = {"key": key, "format": formats, "template": template.describe, "counts": counts,
                "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "examples": total_kept,
                "max_seq_length": data.max_seq_length, "mask_prompt": data.mask_prompt}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # last: marks the folder complete
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return Prepared(folder, manifest, splits)


def _explain_empty(counts: dict, max_seq_length: int) -> None:
    dropped = sum(c["dropped_no_response"] for c in counts.values())
    if dropped:
        raise DataError(f"data.max_seq_length={max_seq_length} is too small: the prompt fills it in every "
                        f"one of {dropped} rows, leaving no response tokens to train on; raise it")
    raise DataError("no training rows left after filtering")


def split_examples(config: RunConfig) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """Seeded, deterministic split; explicit val/test files replace the matching share."""
    data = config.data
    main, fmt = load_examples(data.path, data.format)
    formats = {"train": fmt}
    extra = {}
    for name, key in (("val", "val_path"), ("test", "test_path")):
        if getattr(data, key):
            extra[name], formats[name] = load_examples(getattr(data, key), data.format)
    order = list(range(len(main)))
    random.Random(data.seed).shuffle(order)
    shares = {"test": 0.0 if "test" in extra else data.test_split,
              "val": 0.0 if "val" in extra else data.val_split}
    sizes = {name: int(round(len(main) * share)) for name, share in shares.items()}
    for name in ("test", "val"):  # a requested split gets at least one row when there are enough
        if shares[name] > 0 and sizes[name] == 0 and len(main) >= 3:
            sizes[name] = 1
    test_ids = order[: sizes["test"]]
    val_ids = order[sizes["test"]: sizes["test"] + sizes["val"]]
    train_ids = order[sizes["test"] + sizes["val"]:]
    out = {"train": [main[i] for i in sorted(train_ids)],
           "val": extra.get("val") or [main[i] for i in sorted(val_ids)],
           "test": extra.get("test") or [main[i] for i in sorted(test_ids)]}
    if not out["train"]:
        raise DataError(f"{data.path}: {len(main)} rows leave none for training after the val/test split")
    return out, formats


def tokenize(examples: list[Example], template: Template, encoder: Encoder, tokenizer,
             max_seq_length: int, mask_prompt: bool) -> tuple[TokenizedSplit, list[dict], dict]:
    ids_list, sup_list, rows = [], [], []
    stats = {"rows": len(examples), "examples": 0, "truncated": 0, "dropped_no_response": 0,
             "tokens": 0, "supervised_tokens": 0}
    for example in examples:
        ids, supervised = encoder.encode(pieces(template, example, tokenizer), mask_prompt)
        if len(ids) > max_seq_length:
            stats["truncated"] += 1
            ids, supervised = ids[:max_seq_length], supervised[:max_seq_length]
        if not any(supervised[1:]):
            stats["dropped_no_response"] += 1  # never train on a row with nothing to learn
            continue
        ids_list.append(ids)
        sup_list.append(supervised)
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += sum(supervised)
        rows.append({"where": example.where, "prompt": prompt_text(template, example, tokenizer),
                     "messages": example.prompt_messages, "reference": example.reference,
                     "extra": example.extra})
    return TokenizedSplit.from_lists(ids_list, sup_list), rows, stats


def summary_lines(prepared: Prepared) -> list[str]:
    lines = []
    for name in SPLITS:
        c = prepared.manifest["counts"][name]
        line = (f"  {name:5} {c['examples']:6d} examples  {c['tokens']:8d} tokens  "
                f"{c['supervised_tokens']:7d} trained-on")
        notes = []
        if c["truncated"]:
            notes.append(f"{c['truncated']} truncated at {prepared.manifest['max_seq_length']} tokens")
        if c["dropped_no_response"]:
            notes.append(f"{c['dropped_no_response']} dropped (response truncated away)")
        lines.append(line + (f"  ({'; '.join(notes)})" if notes else ""))
    return lines


def main(config: RunConfig) -> int:
    from tunesmith.model.load import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(config.model))
    prepared = prepare(config, tokenizer)
    print(f"Prepared {prepared.folder}  (template: {prepared.manifest['template']})")
    for line in summary_lines(prepared):
        print(line)
    return 0
