"""`tunesmith prepare`: raw rows → seeded train/val/test splits → tokens with masked labels.

The result lives in <run>/data/ with a manifest (source hash, tokenizer, template, counts).
It is reused when nothing that shapes it changed, and written atomically: a temporary folder
renamed into place, the manifest written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data import sources
from tunesmith.data.dataset import TokenizedSplit, read_rows, write_rows
from tunesmith.data.formats import Example
from tunesmith.data.gather import Gathered, gather
from tunesmith.data.pairs import check_format, tokenize_preference
from tunesmith.data.templates import Encoder, Template, choose, pieces, prompt_of
from tunesmith.data.text import pack_documents, within_length_limits
from tunesmith.errors import DataError
from tunesmith.log import say

FORMAT_VERSION = 2  # bump when the prepared layout or tokenization changes
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
    """The whole tokenizer: every token and merge (its tokenizers JSON), template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text = json.dumps([body, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_key(config: RunConfig, tokenizer) -> dict:
    """What the prepared data depends on: the sources' content, the data settings, the tokenizer."""
    data = config.data
    for k in ("path", "val_path", "test_path"):
        if getattr(data, k) and not Path(getattr(data, k)).exists():
            raise DataError(f"data.{k}: data file {getattr(data, k)} not found")
    hashes = {k: sources.fingerprint(getattr(data, k)) for k in ("path", "val_path", "test_path")
              if getattr(data, k)}
    settings = data.model_dump(exclude={"path", "val_path", "test_path"})
    settings["template"] = choose(data.template, tokenizer, data.system_prompt).spec  # auto, resolved
    if config.objective != "sft":  # pairs and KTO answers are laid out differently
        settings["objective"] = config.objective
    return {"version": FORMAT_VERSION, "sources": hashes, "settings": settings,
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def prepare(config: RunConfig, tokenizer, *, force: bool = False) -> Prepared:
    if not config.data.path:
        raise DataError("data.path is not set: give a data file or folder (e.g. --data.path train.jsonl)")
    from tunesmith.locks import exclusive

    folder = config.run_dir / "data"
    key = data_key(config, tokenizer)
    with exclusive(folder):  # the ranks of one run start together: one builds, the others reuse
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
    template = dataclasses.replace(template, last_turn_only=data.assistant_turns == "last")
    gathered = gather(config)
    examples, formats = gathered.examples, gathered.formats
    for source_key, source in gathered.sources.items():
        split = "train" if source_key == "path" else source_key.removesuffix("_path")
        check_format(formats[split], config.objective, f"data.{source_key} ({source['path']})")
    say(f"Data format: {', '.join(sorted(set(formats.values())))} "
        f"({'detected from the keys' if data.format == 'auto' else 'as configured'}); "
        f"template: {'none (text blocks)' if gathered.format == 'text' else template.describe}")
    for line in cleaning_lines(gathered):
        say(line)
    tokenized = {name: tokenize_split(examples[name], formats[name], template, tokenizer, data,
                                      config.objective) for name in SPLITS}
    counts = {name: stats for name, (_, _, stats) in tokenized.items()}
    splits = {name: split for name, (split, _, _) in tokenized.items()}
    total_kept = sum(c["examples"] for c in counts.values())
    if counts["train"]["examples"] == 0:
        _explain_empty(counts, data.max_seq_length)
    # Every user error is raised above, before anything is written.
    tmp = folder.with_name(f"data.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, (split, rows, _) in tokenized.items():
            split.save(tmp / name)
            write_rows(tmp / name, rows)
    except BaseException:  # a full disk or an interrupt: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    described = "none (text blocks)" if gathered.format == "text" else template.describe
    manifest = {"key": key, "format": formats, "template": described, "counts": counts,
                "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "examples": total_kept,
                "max_seq_length": data.max_seq_length, "mask_prompt": data.mask_prompt,
                "sources": gathered.sources, "cleaning": gathered.cleaning, "leakage": gathered.leakage,
                "folds": gathered.folds}
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
    filtered = {k: sum(c.get(k, 0) for c in counts.values()) for k in ("too_short", "too_long")}
    if any(filtered.values()):
        raise DataError(f"no training rows left: the length filters removed {filtered['too_short']} rows "
                        f"under data.clean.min_tokens and {filtered['too_long']} over data.clean.max_tokens")
    raise DataError("no training rows left after filtering")


def cleaning_lines(gathered: Gathered) -> list[str]:
    """One line per source on what cleaning changed, and one per split that leaked."""
    lines = []
    for key, report in gathered.cleaning.items():
        done = [f"{n} {step.replace('_', ' ')}" for step, n in report["counts"].items() if n]
        if done:
            lines.append(f"Cleaning {gathered.sources[key]['path']}: {report['rows_in']} rows -> "
                         f"{report['rows_out']} ({'; '.join(done)})")
    for name, leak in gathered.leakage.items():
        if leak["leaked"]:
            action = "removed" if leak["removed"] else "kept (data.clean.leakage: report)"
            lines.append(f"Leakage: {leak['leaked']} of {leak['rows']} {name} rows repeat a train row "
                         f"({leak['exact']} exact, {leak['near']} near); {action}")
    return lines


def split_examples(config: RunConfig) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """Read, clean and split the data: the examples of each split and their formats."""
    gathered = gather(config)
    return gathered.examples, gathered.formats


def tokenize_split(examples: list[Example], fmt: str, template: Template, tokenizer, data, objective: str = "sft"
                   ) -> tuple[TokenizedSplit, list[dict], dict]:
    if objective != "sft":
        return tokenize_preference(examples, fmt, objective, template, tokenizer, data.max_seq_length,
                                   data.clean.min_tokens, data.clean.max_tokens)
    encoder = Encoder(tokenizer)
    if fmt == "text":
        return pack_documents(examples, encoder, tokenizer, data.max_seq_length, data.clean.min_tokens,
                              data.clean.max_tokens)
    return tokenize(examples, template, encoder, tokenizer, data.max_seq_length, data.mask_prompt,
                    data.clean.min_tokens, data.clean.max_tokens)


def tokenize(examples: list[Example], template: Template, encoder: Encoder, tokenizer,
             max_seq_length: int, mask_prompt: bool, min_tokens: int = 0, max_tokens: int | None = None
             ) -> tuple[TokenizedSplit, list[dict], dict]:
    ids_list, sup_list, rows = [], [], []
    stats = {"rows": len(examples), "examples": 0, "truncated": 0, "dropped_no_response": 0,
             "too_short": 0, "too_long": 0, "tokens": 0, "supervised_tokens": 0}
    for example, parts, (ids, supervised) in _encoded(examples, template, encoder, tokenizer, mask_prompt):
        if not within_length_limits(len(ids), min_tokens, max_tokens, stats):
            continue
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
        rows.append({"where": example.where, "prompt": prompt_of(parts),
                     "messages": example.prompt_messages, "reference": example.reference,
                     "extra": example.extra})
    return TokenizedSplit.from_lists(ids_list, sup_list), rows, stats


ENCODE_BATCH = 1024  # examples whose pieces go to the tokenizer in one call


def _encoded(examples: list[Example], template: Template, encoder: Encoder, tokenizer, mask_prompt: bool):
    """(example, its pieces, (ids, supervised)) for each example, tokenized a batch at a time."""
    for start in range(0, len(examples), ENCODE_BATCH):
        batch = examples[start:start + ENCODE_BATCH]
        parts = [pieces(template, example, tokenizer) for example in batch]
        yield from zip(batch, parts, encoder.encode_many(parts, mask_prompt))


def summary_lines(prepared: Prepared) -> list[str]:
    lines = []
    for name in SPLITS:
        c = prepared.manifest["counts"][name]
        unit = "pairs" if "chosen_longer" in c and c.get("chosen_tokens") else "examples"
        line = (f"  {name:5} {c['examples']:6d} {unit:8} {c['tokens']:8d} tokens  "
                f"{c['supervised_tokens']:7d} trained-on")
        notes = []
        if c["truncated"]:
            notes.append(f"{c['truncated']} truncated at {prepared.manifest['max_seq_length']} tokens")
        notes += pair_notes(c)
        if c["dropped_no_response"]:
            notes.append(f"{c['dropped_no_response']} dropped (response truncated away)")
        if c.get("too_short") or c.get("too_long"):
            notes.append(f"{c.get('too_short', 0)} under min_tokens, {c.get('too_long', 0)} over max_tokens "
                         "dropped")
        lines.append(line + (f"  ({'; '.join(notes)})" if notes else ""))
    return lines


def pair_notes(counts: dict) -> list[str]:
    """Preference splits: which side was truncated, and whether chosen answers are simply longer
    (a model can learn 'longer wins' instead of the preference)."""
    if "chosen_longer" not in counts or not counts["examples"]:
        return []  # supervised data, or an empty split
    if not counts["chosen_tokens"]:  # kto answers
        return [f"{counts['desirable']} desirable, {counts['undesirable']} undesirable answers"]
    pairs = counts["examples"]
    notes = [f"chosen longer in {100 * counts['chosen_longer'] / pairs:.0f}% of pairs, "
             f"{counts['chosen_tokens'] / pairs:.0f} vs {counts['rejected_tokens'] / pairs:.0f} answer tokens"]
    if counts["truncated_chosen"] or counts["truncated_rejected"]:
        notes.append(f"cut: {counts['truncated_chosen']} chosen, {counts['truncated_rejected']} rejected")
    return notes


def main(config: RunConfig) -> int:
    from tunesmith.crossval import fold_configs
    from tunesmith.model.load import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(config.model))
    for fold_config in fold_configs(config):  # the config itself unless data.folds > 1
        prepared = prepare(fold_config, tokenizer)
        print(f"Prepared {prepared.folder}  (template: {prepared.manifest['template']})")
        for line in summary_lines(prepared):
            print(line)
    return 0
