"""Fuzzing: generated bad inputs on every surface a user touches, counting what must never happen.

    .venv/bin/python bench/fuzz.py [--cases 1000] [--seed 0] [--write] [--only I] [--surfaces a,b]

Four surfaces, each fed inputs that are wrong in generated ways:
  config  YAML files: wrong types, unknown keys, out-of-range and cross-key values, broken YAML,
          damaged bytes, missing or odd paths; run through `prepare`, `inspect` or `estimate`
  cli     the command line: `--section.key value` with junk values, malformed and unknown flags,
          unknown verbs, missing files, junk options of the argparse verbs (generate, merge, ...)
  data    every kind of source tunesmith reads (JSON, JSONL, CSV/TSV, Parquet, HTML, SQLite, .sql
          dump, a folder of .txt/.md, a datasets folder) with malformed rows, bytes, encodings and
          empty fields; each input goes through `prepare` (even cases) and `inspect` (odd cases)
  serve   HTTP requests to one `tunesmith serve` started once on a tiny random model: bad JSON,
          wrong types, huge values, missing fields, bad stop lists, oversize bodies, unknown models,
          wrong methods and paths, bad API keys, clients that hang up mid-stream

The CLI is called in-process (`tunesmith.cli.main`, stdout and stderr captured, stdin empty, a
watchdog per case); the server is a real process whose stderr is read for tracebacks.
What is counted, per surface (cases with that problem; the target is 0 everywhere):
  traceback        an exception escaping main(), or a Python traceback in any output or server log
  5xx              a server answer (or an error event in a stream) of status 500 and above
  half-written     after a refusal: a run folder that now exists, an existing prepared run that
                   changed, a temporary file, or any file in the (empty) working folder; after an
                   accepted prepare or inspect: no manifest or report
  exit code        a refusal whose exit code is not 2
  message          a refusal whose last stderr line is not `tunesmith: [config ]error: ...`
                   (argparse's `tunesmith VERB: error: ...` after its usage line counts too)
  bad input taken  an input that is certainly wrong (unknown key, out-of-range value, broken
                   file) accepted with exit 0 or a 2xx
  hang             a CLI case still running after --case-seconds
  error body       a 4xx without an OpenAI-style {"error": {"message": ...}} body
  left data        a refusal that left a run folder holding only complete prepared data (a data folder
                   with its manifest): not half-written, but written before the input was checked
Case i comes from its own random.Random(f"{seed}:{surface}:{n}"), so `--only i` replays it alone.
With --write the summary replaces the fuzz section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import hashlib
import http.client
import importlib.util
import io
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

# Before torch or transformers are imported: nothing may reach a hub, and one thread per op keeps a
# shared 2-core machine usable (spinning OpenMP threads make every op wait for a busy core).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
RESULTS_BEGIN, RESULTS_END = "<!-- fuzz:begin -->", "<!-- fuzz:end -->"
SHARES = {"config": 0.25, "cli": 0.2, "data": 0.35, "serve": 0.2}  # of --cases, run in this order
PROBLEMS = ("traceback", "5xx", "half-written", "exit code", "message", "bad input taken", "hang",
            "error body", "server down", "left data")
TRACEBACK = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"^tunesmith( [a-z]+)?: (config )?error: \S")
SERVER_ERRORS = (TRACEBACK, "Exception in ASGI application", "ERROR:")
API_KEY = "fuzz-key"
MAX_BODY_BYTES = 1 << 18  # the server's --max-body-bytes: oversize bodies stay cheap to send
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform"]


def load_tiny():
    """tests/tiny.py (tiny random models and tokenizer), imported by path: bench is not a package."""
    spec = importlib.util.spec_from_file_location("tiny", REPO / "tests" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- cases and what came of them -------------------------------------------------------------

@dataclass
class HttpCase:
    method: str
    path: str
    body: bytes | None = None  # None: the JSON of the (mutated) good request
    headers: dict = field(default_factory=dict)
    chunked: bool = False  # send the body with Transfer-Encoding: chunked (no Content-Length)
    hang_up: bool = False  # read the first bytes of the answer, then close the connection
    half_close: bool = False  # stop writing after the body (a Content-Length that promised more)


@dataclass
class Case:
    index: int
    surface: str
    folder: Path  # the case's own scratch folder: its input files, its run folder
    label: str = ""  # what is wrong with the input, in words
    must_fail: bool = False  # certainly wrong: exit 0 or a 2xx would be taking it
    argv: list[str] = field(default_factory=list)
    run_dir: Path | None = None  # did not exist before; must not exist after a refusal
    guard: Path | None = None  # an existing prepared run that a refusal must leave as it was
    request: HttpCase | None = None
    shown: str = ""  # the input, abridged, for the report


@dataclass
class Outcome:
    case: Case
    result: str  # refused | accepted | no answer
    problems: list[str]
    detail: str = ""  # exit code or status and the error line, or the traceback's last line
    seconds: float = 0.0


@dataclass
class Fixture:
    """What every generator may point at: built once before the cases run."""
    work: Path
    model: Path  # a tiny random llama with a chat template
    good_data: Path  # 24 clean question/answer rows
    good_run: Path  # a run whose data is prepared: refusals must leave it exactly as it was
    snapshot: dict = field(default_factory=dict)  # good_run's files -> sha256


def pick(rng: random.Random, items):
    return items[rng.randrange(len(items))]


def abridge(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates shown, not raised
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"


# ---- junk ------------------------------------------------------------------------------------

LIST_JUNK = ["x", {"y": 1}]  # wrong for every list, tuple and scalar field
DICT_JUNK = {"y": [1]}  # wrong for every field, dict[str, str] and sections included
ODD_VALUES = [True, False, "", " ", 0, -1, -(10 ** 40), 10 ** 40, 2 ** 63, 1e308, -1e308, 5e-324,
              float("nan"), float("inf"), float("-inf"), "\x00", "ü∂ß\u202e", "a\nb", "x" * 5000,
              "{prompt}", "{0}", "%s", "../../etc/passwd", [], {}, [None], ["a"] * 50]
FLAG_JUNK = ["abc", "", " ", "-1", "0", "1e999", "-inf", "nan", ".nan", ".inf", "[", "]", "{", "}", "{a: 1}",
             "[1, 2", "'", '"', "!!python/object/apply:os.system [echo]", "&a x", "*a", "%YAML 1.2", "@x",
             "`x`", "|", ">", "? x", "- x", "0x1F", "0o17", "1_000", "yes", "no", "on", "~", "null", "true",
             str(2 ** 63), str(10 ** 40), "9" * 400, "ü∂ß", "\u202e", "a\nb", "-", "x=y", "a: b", "#comment",
             "{prompt}", "{0}", "\t", "1,2,3", "[q_proj, 5]", "{x: [1, {y: 2}]}", "!!binary AAAA"]
TEXT_JUNK = [None, "", "   ", "\t\n", 5, 1.5, True, [], {}, ["a"], {"x": "y"}, [{"role": "user"}], "\x00",
             "\ud800", "\udfff lone", "\ufeff", "\u200b\u200b", "x" * 20000, "\x1b[31mred", "\u202eevil",
             "🙂" * 50, float("nan"), float("inf"), -0.0, 10 ** 30, "null", "As an AI language model, no."]


def kinds_of(annotation) -> set[str]:
    """What a config field accepts, coarsely: int, float, str, bool, none, list, dict, literal, section."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(kinds_of(a) for a in get_args(annotation)))
    if annotation is type(None):
        return {"none"}
    if origin is Literal:
        return {"literal"}
    if origin in (list, tuple):
        return {"list"}
    if origin is dict:
        return {"dict"}
    names = {int: "int", float: "float", str: "str", bool: "bool"}
    return {names[annotation]} if annotation in names else {"section"}


def literal_choices(annotation) -> set:
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    return set().union(set(), *(literal_choices(a) for a in get_args(annotation)))


def wrong_type_value(rng: random.Random, annotation) -> tuple[Any, bool]:
    """A value of the wrong type for the field, and whether it is certainly refused."""
    kinds = kinds_of(annotation)
    certain = [LIST_JUNK, DICT_JUNK]
    if "str" not in kinds and "abc" not in literal_choices(annotation):
        certain.append("abc")
    if "float" not in kinds:
        certain.append(3.7)  # pydantic takes 3.0 for an int, never 3.7
    if not kinds & {"int", "float"}:
        certain.append(7)
    if "none" not in kinds:
        certain.append(None)
    if rng.random() < 0.6:
        return pick(rng, certain), True
    return pick(rng, ODD_VALUES), False


def config_fields() -> list[tuple[str, Any]]:
    """(dotted key, field info) of every leaf config key, from the config's own declarations."""
    from tunesmith import config as config_module

    out = []

    def walk(prefix: str, model) -> None:
        for name, info in model.model_fields.items():
            if kinds_of(info.annotation) == {"section"}:
                walk(f"{prefix}{name}.", info.annotation)
            else:
                out.append((f"{prefix}{name}", info))

    walk("", config_module.RunConfig)
    return [(key, info) for key, info in out if key not in ("model", "out_dir")]  # the fuzzer sets those


def has_own_validator(dotted: str) -> bool:
    """A field with a validator of its own may turn a value of another type into a good one."""
    from tunesmith import config as config_module

    section, _, name = dotted.rpartition(".")
    model = config_module.RunConfig
    for part in filter(None, section.split(".")):
        model = model.model_fields[part].annotation
    validators = model.__pydantic_decorators__.field_validators.values()
    return any(name in decorator.info.fields for decorator in validators)


def out_of_range(rng: random.Random, info) -> Any | None:
    """A number just or far outside the field's declared bounds (None when it has none)."""
    values = []
    for bound in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            limit = getattr(bound, name, None)
            if limit is None:
                continue
            below = name in ("ge", "gt")
            far = -(10 ** 30) if below else 10 ** 30
            step = 1 if isinstance(limit, int) else 1e-6
            nearest = limit if name in ("gt", "lt") else (limit - step if below else limit + step)
            values += [nearest, far]
    return pick(rng, values) if values else None


def set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[parts[-1]] = value


def typo(rng: random.Random, key: str) -> str:
    section, _, name = key.rpartition(".")
    mangled = pick(rng, [name[:-1], name + "s", name.replace("_", "-"), name.upper(), name[1:], "lr",
                         "num_train_epochs", "per_device_train_batch_size", "lora_r", "dataset"])
    mangled = mangled if mangled != name else name + "_x"
    return f"{section}.{mangled}" if section else mangled


# ---- byte-level damage, for any file ---------------------------------------------------------

def damage(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """One kind of damage to a file's bytes, and its name."""
    cut = rng.randrange(len(raw) + 1)
    bad_utf8 = pick(rng, [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
    text = raw.decode("utf-8", "replace")
    choices = [
        ("truncated", lambda: raw[:cut]),
        ("invalid UTF-8", lambda: raw[:cut] + bad_utf8 + raw[cut:]),
        ("NUL byte", lambda: raw[:cut] + b"\x00" + raw[cut:]),
        ("UTF-16", lambda: text.encode("utf-16")),
        ("latin-1", lambda: text.replace("a", "é").encode("latin-1", "replace")),
        ("BOM", lambda: b"\xef\xbb\xbf" + raw),
        ("CR line ends", lambda: raw.replace(b"\n", b"\r")),
        ("random bytes", lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))),
        ("empty", lambda: b""),
        ("whitespace only", lambda: b" \n\t\r\n  "),
        ("byte flipped", lambda: raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1:]),
        ("junk spliced", lambda: raw[:cut] + pick(rng, FLAG_JUNK).encode("utf-8") + raw[cut:]),
        ("line doubled and cut", lambda: raw[:cut] + raw[: max(1, cut // 2)]),
    ]
    name, make = pick(rng, choices)
    return make(), name


# ---- (a) config files ------------------------------------------------------------------------

SEMANTIC = [
    ({"train": {"batch_size": 10, "micro_batch_size": 4}}, "batch not a multiple of micro batch"),
    ({"data": {"val_split": 0.6, "test_split": 0.5}}, "val + test splits leave nothing"),
    ({"data": {"folds": 3, "fold": 5}}, "fold above folds"),
    ({"data": {"fold": 2}}, "fold without folds"),
    ({"data": {"folds": 3, "val_path": "x.jsonl"}}, "folds with val_path"),
    ({"data": {"query": "SELECT 1", "table": "t"}}, "query and table"),
    ({"train": {"strategy": "fsdp"}, "method": "lora"}, "fsdp with lora"),
    ({"train": {"devices": 9, "batch_size": 2, "micro_batch_size": 1}}, "more devices than batch"),
    ({"data": {"columns": {"questoin": "q"}}}, "unknown column target"),
    ({"train": {"grad_clip": -1}}, "negative grad clip"),
]
# (name, text, certainly refused)
BROKEN_YAML = [
    ("unclosed bracket", "data: {path: [x\n", True), ("tab indentation", "data:\n\tpath: x\n", True),
    ("top-level list", "- model\n- data\n", True), ("top-level scalar", "just words\n", True),
    ("two documents", "model: a\n---\nmodel: b\n", True),
    ("python tag", "model: !!python/object/apply:os.system [echo]\n", True),
    ("undefined alias", "model: *nowhere\n", True), ("colon soup", "data: : : path\n", True),
    ("deep nesting", "data: " + "[" * 3000 + "\n", True),
    ("deep mapping", "data:\n" + "".join(" " * i + "k:\n" for i in range(1, 400)), True),
    ("unhashable key", "? [a, b]\n: c\n", True), ("non-string keys", "1: 2\nnull: 3\n", False),
    ("NUL byte", "model: a\x00b\n", True),
    ("duplicate anchors", "a: &x 1\nb: &x 2\ntrain: {batch_size: *x}\n", True),
    ("binary tag", "data: !!binary AAAA\n", True), ("set tag", "train: !!set {a, b}\n", True),
    ("timestamp", "train: {learning_rate: 2001-12-14t21:59:43.10-05:00}\n", True),
    ("huge int", f"train: {{batch_size: {10 ** 400}}}\n", False), ("bad escape", 'model: "\\q"\n', True),
]
FIELD_MUTATIONS = ("wrong type", "out of range", "unknown key", "literal", "section", "semantic", "paths",
                   "template", "model")
TEMPLATES = ["{prompt", "{prompt} {0}", "{prompt} {x.y}", "{prompt!z}", "{prompt:>{w}}", "{prompt} }",
             "{prompt[0]}", "{prompt:d}", "no placeholder", "{{prompt}}", "{input}", "{prompt.__class__}",
             "{prompt} {input.x}"]
LEGAL_TEMPLATES = ["{prompt}{prompt}", "{system}{prompt}{input}\x00"]


def config_case(rng: random.Random, fixture: Fixture, case: Case) -> None:
    raw = {"model": str(fixture.model), "data": {"path": str(fixture.good_data), "max_seq_length": 64}}
    verb = pick(rng, ["prepare", "prepare", "inspect", "estimate"])
    kind = pick(rng, [*FIELD_MUTATIONS, "wrong type", "out of range", "two at once", "broken yaml", "broken yaml",
                      "damaged bytes", "config path"])
    if kind == "two at once":
        kinds = [pick(rng, FIELD_MUTATIONS[:6]) for _ in range(2)]
    else:
        kinds = [kind] if kind in FIELD_MUTATIONS else []
    changes = [mutate_config(rng, one, raw, fixture, case.folder) for one in kinds]
    labels, case.must_fail = [label for label, _ in changes], any(must for _, must in changes)
    if verb == "estimate" and kind in ("paths", "template"):
        case.must_fail = False  # estimate reads neither the data nor the template
    text = yaml.safe_dump(raw, allow_unicode=False, sort_keys=False)
    if kind == "broken yaml":
        name, text, case.must_fail = pick(rng, BROKEN_YAML)
        labels = [f"broken YAML: {name}"]
    data = text.encode("utf-8", "surrogatepass")
    if kind == "damaged bytes":
        data, name = damage(rng, data)
        labels, case.must_fail = [f"config bytes: {name}"], False
    path = case.folder / "run.yaml"
    path.write_bytes(data)
    config_arg = str(path)
    if kind == "config path":
        config_arg, label = odd_config_path(rng, fixture, case.folder)
        labels, case.must_fail = [label], True
    case.run_dir = case.folder / "run"
    case.argv = [verb, config_arg, "--out_dir", str(case.run_dir)]
    if kind != "model":  # a config that lost its model key must not fall back to the embedded model (30 s)
        case.argv += ["--model", str(fixture.model)]
    case.label = f"{verb}: " + "; ".join(labels)
    case.shown = abridge(data.decode("utf-8", "replace"), 200)


def mutate_config(rng: random.Random, kind: str, raw: dict, fixture: Fixture, folder: Path) -> tuple[str, bool]:
    """Change `raw` in one way of `kind`; (what changed, whether it is certainly refused)."""
    fields = config_fields()
    if kind == "wrong type":
        key, info = pick(rng, fields)
        value, certain = wrong_type_value(rng, info.annotation)
        set_dotted(raw, key, value)
        return f"{key}={abridge(value, 40)}", certain and not has_own_validator(key)
    if kind == "out of range":
        key, _, value = pick(rng, [(k, i, v) for k, i in fields if (v := out_of_range(rng, i)) is not None])
        set_dotted(raw, key, value)
        return f"{key}={value} out of range", True
    if kind == "unknown key":
        key, _ = pick(rng, fields)
        wrong = pick(rng, [typo(rng, key), key + ".deeper", "trian.max_steps", "data.clean.foo", "extra"])
        set_dotted(raw, wrong, 1)
        return f"unknown key {wrong}", True
    if kind == "literal":
        key, info = pick(rng, [(k, i) for k, i in fields if "literal" in kinds_of(i.annotation)])
        first = min(map(str, literal_choices(info.annotation)))
        value = pick(rng, [first.upper(), first + " ", "none", "bogus", "", first[:-1] or "x"])
        set_dotted(raw, key, value)
        return f"{key}={value!r} not a choice", value not in literal_choices(info.annotation)
    if kind == "section":
        section = pick(rng, ["data", "train", "lora", "eval", "qlora", "adapter", "data.clean"])
        set_dotted(raw, section, pick(rng, [5, "x", [1, 2], True]))
        return f"section {section} is not a mapping", True
    if kind == "semantic":
        extra, label = pick(rng, SEMANTIC)
        for section, values in extra.items():
            current = raw.get(section) if isinstance(raw.get(section), dict) else {}  # "section" may have run
            raw[section] = {**current, **values} if isinstance(values, dict) else values
        return label, True
    return mutate_config_paths(rng, kind, raw, fixture, folder)


def mutate_config_paths(rng: random.Random, kind: str, raw: dict, fixture: Fixture, folder: Path
                        ) -> tuple[str, bool]:
    if kind == "paths":
        blocker = folder / "a-file"
        blocker.write_text("not a folder\n")
        key, value = pick(rng, [("data.path", str(folder / "missing.jsonl")), ("data.path", ""),
                                ("data.path", str(folder)), ("data.val_path", str(folder / "none.csv")),
                                ("data.test_path", "/dev/null"), ("data.path", "~nobody/x.jsonl"),
                                ("data.path", str(blocker / "under-a-file.jsonl")),
                                ("eval.bias_pairs", "missing.yaml")])
        set_dotted(raw, key, value)
        return f"{key}={value!r}", key.startswith("data.")
    if kind == "template":
        value = pick(rng, TEMPLATES + LEGAL_TEMPLATES)
        set_dotted(raw, "data.template", value)
        return f"data.template={value!r}", value not in LEGAL_TEMPLATES
    value = pick(rng, [str(folder / "no-model"), str(fixture.good_data), "", "nobody/nothing-here", "a/b/c",
                       str(folder), "x.gguf", "~/nope"])
    raw["model"] = value
    return f"model={value!r}", True


def odd_config_path(rng: random.Random, fixture: Fixture, folder: Path) -> tuple[str, str]:
    empty = folder / "empty-dir"
    empty.mkdir()
    junk_run = folder / "junk-run"
    junk_run.mkdir()
    (junk_run / "config.yaml").write_bytes(b"\xff\xfe\x00junk")
    return pick(rng, [(str(folder / "missing.yaml"), "config file missing"),
                      (str(empty), "a folder without config.yaml"),
                      (str(junk_run), "a run folder whose config.yaml is not text"),
                      (str(fixture.model / "model.safetensors"), "a binary file as the config"),
                      ("/dev/null", "/dev/null as the config")])


# ---- (b) the command line --------------------------------------------------------------------

CONFIG_VERBS = ("prepare", "inspect", "finetune", "estimate", "evaluate", "report")
MALFORMED = [["-x"], ["--"], ["---x", "1"], ["--=5"], ["--.", "1"], ["--data..path", "x"], ["--data.", "x"],
             ["--.data", "x"], ["positional"], ["--train", "5"], ["--train.batch_size", "4", "--train", "3"],
             ["--train.batch_size.x", "3"], ["--data.columns", "x"], ["--data.columns.question"],
             ["--data.path"], ["--train.betas", "1"], ["--data.clean", "5"], ["--data.columns.", "x"],
             ["--eval.tasks", "[1, [2]]"], ["--x" * 200, "1"], ["--data.path", "a", "b"]]
LEGAL_FLAGS = [["--model"], ["--lora.target_modules", "{a: b}"]]  # a bare flag is "true"; any module name


def cli_case(rng: random.Random, fixture: Fixture, case: Case) -> None:
    kind = pick(rng, ["junk value"] * 3 + ["unknown key", "malformed flags", "malformed flags", "unknown verb",
                                            "missing file", "missing file", "argparse", "argparse", "argparse",
                                            "device"])
    case.run_dir = case.folder / "run"
    if kind == "unknown verb":
        verb = pick(rng, ["prepar", "fine-tune", "Prepare", "train", "", " ", "--version", "-v", "help me",
                          "serv", "inspect;", "🙂", "\x00", "--prepare", "report.html"])
        case.argv = [verb, "--out_dir", str(case.run_dir)]
        case.label, case.must_fail = f"unknown verb {verb!r}", True
    elif kind == "argparse":
        argparse_case(rng, fixture, case)
    elif kind == "missing file":
        missing_file_case(rng, fixture, case)
    else:
        flags_case(rng, fixture, case, kind)
    case.shown = abridge(" ".join(case.argv), 220)


def config_verb_argv(rng: random.Random, fixture: Fixture, run_dir: Path) -> tuple[str, list[str]]:
    verb = pick(rng, CONFIG_VERBS)
    data = fixture.good_data
    if verb == "finetune":  # a finetune that happens to be valid must stop at the data, not train
        data = run_dir.parent / "broken.jsonl"
        data.write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    argv = [verb, "--model", str(fixture.model), "--data.path", str(data), "--out_dir", str(run_dir),
            "--data.max_seq_length", "64", "--train.max_steps", "1", "--train.device", "cpu",
            "--train.precision", "fp32"]
    return verb, argv


def flags_case(rng: random.Random, fixture: Fixture, case: Case, kind: str) -> None:
    verb, argv = config_verb_argv(rng, fixture, case.run_dir)
    keys = [key for key, _ in config_fields()]
    if kind == "junk value":
        extra = []
        for _ in range(rng.randint(1, 3)):
            key, value = pick(rng, keys), pick(rng, FLAG_JUNK)
            extra += [f"--{key}={value}"] if rng.random() < 0.3 else [f"--{key}", value]
        case.label, case.must_fail = f"{verb}: junk values {extra}", False
    elif kind == "unknown key":
        extra = [f"--{typo(rng, pick(rng, keys))}", pick(rng, ["1", "x", "true"])]
        case.label, case.must_fail = f"{verb}: unknown key {extra[0]}", True
    elif kind == "device":  # on this machine: cuda (when it has no GPU), a GPU it lacks, no device at all
        extra = ["--train.device", pick(rng, ["cuda", "cuda:99", "1,2,3", "gpu", "CPU", "", "cuda:x"])]
        uses_device = verb in ("finetune", "estimate", "evaluate")
        case.label, case.must_fail = f"{verb}: device {extra[1]!r}", uses_device and extra[1] != "cuda"
    else:
        extra = pick(rng, MALFORMED + LEGAL_FLAGS)
        case.label, case.must_fail = f"{verb}: malformed flags {abridge(extra, 80)}", extra not in LEGAL_FLAGS
    case.argv = argv + extra


def missing_file_case(rng: random.Random, fixture: Fixture, case: Case) -> None:
    missing, run = str(case.folder / "missing"), str(case.run_dir)
    empty = case.folder / "empty-dir"
    empty.mkdir()
    model, good = str(fixture.model), str(fixture.good_data)
    given = ["--model", model, "--out_dir", run, "--data.path"]
    choices = [
        (["prepare", missing + ".yaml"], "config file missing"),
        (["inspect", str(empty)], "a folder without config.yaml"),
        (["prepare", *given, missing + ".jsonl"], "data file missing"),
        (["prepare", *given, good, "--data.val_path", missing + ".csv"], "val file missing"),
        (["prepare", "--model", missing, "--data.path", good, "--out_dir", run], "model folder missing"),
        (["report", missing], "run folder missing"), (["evaluate", missing], "run folder missing"),
        (["merge", missing], "run folder missing"), (["export", missing], "run folder missing"),
        (["merge", str(empty)], "an empty folder as the run"), (["export", good], "a file as the run"),
        (["generate", "--adapter", missing, "--prompt", "hi"], "run folder missing"),
        (["generate", "--model", missing, "--prompt", "hi"], "model missing"),
        (["chat", "--adapter", missing], "run folder missing"),
        (["serve", "--port", "0", "--model", missing], "model missing"),
        (["serve", "--port", "0", "--adapter", missing], "run folder missing"),
        (["estimate", "--model", missing], "model missing"),
        (["finetune", *given, missing + ".parquet"], "data file missing"),
        (["finetune", *given, good, "--resume", missing, "--train.max_steps", "1"], "resume checkpoint missing"),
        (["evaluate", *given, missing + ".jsonl"], "data file missing"),
    ]
    case.argv, label = pick(rng, choices)
    case.label, case.must_fail = f"{case.argv[0]}: {label}", True


def argparse_case(rng: random.Random, fixture: Fixture, case: Case) -> None:
    """Verbs with options of their own. serve and demo only get inputs that stop them before they
    start (a junk option, a missing model): a valid one would serve forever or run the real demo."""
    model, junk, none = str(fixture.model), pick(rng, FLAG_JUNK), str(case.folder / "none")
    prepared = str(case.folder / "prepared-run")  # a copy: report and evaluate write into the run they get
    shutil.copytree(fixture.good_run, prepared)
    number = pick(rng, ["-5", "0", "-1", "1e-30", "nan", "inf", "-inf", "1e30", "2", "100000"])
    ask = ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "4"]
    serve = ["serve", "--port", "0", "--model"]
    chat = ["chat", "--max-new-tokens", "2", "--model", model]
    choices = [
        (["generate", "--model", model, "--prompt", pick(rng, ["hi", "", "\x00", "x" * 3000]), "--max-new-tokens",
          pick(rng, ["-5", "0", "3", junk])], "generate: odd length", False),
        ([*ask, "--temperature", number], f"generate: temperature {number}", False),
        ([*ask, "--temperature", "1", "--top-p", number], f"generate: top-p {number}", False),
        ([*ask, "--template", junk], "generate: junk template", False),
        (["generate", "--model", model], "generate: no prompt", True),
        (["generate", "--prompt", "hi"], "generate: no model", True),
        (["estimate", "--model", model, "--memory", junk], "estimate: junk memory", False),
        (["estimate", "--model", model, "--pretrain-lr", junk, "--pretrain-batch-tokens",
          pick(rng, ["4M", junk])], "estimate: junk pre-training figures", False),
        (["estimate", "--model", model, "--pretrain-lr", "3e-4"], "estimate: one of a pair", True),
        (["merge", prepared, "--dtype", junk], "merge: junk dtype", True),
        (["merge", prepared, "--out", str(case.run_dir)], "merge: a run without weights", True),
        (["export", prepared, "--type", junk], "export: junk type", True),
        (["export", prepared, "--samples", number, "--out", str(case.run_dir)], "export: a run without weights",
         True),
        (["report", prepared, "--eval.max_samples", junk], "report: junk value", False),
        (["evaluate", prepared, "--tasks", junk], "evaluate: junk tasks", False),
        (["serve", "--model", none, "--port", pick(rng, ["x", "-1", "99999999", "1.5"])], "serve: junk port",
         True),
        ([*serve, none, pick(rng, ["--max-tokens", "--threads", "--max-body-bytes", "--max-queue"]),
          pick(rng, ["0", "-3", junk])], "serve: junk limit", True),
        ([*serve, model, "--threads", pick(rng, ["0", "-1"])], "serve: no threads", True),
        ([*serve, none, "--", "--gpu"], "serve: args after --", True),
        ([*serve, model, "--engine", pick(rng, ["VLLM", "x", ""])], "serve: junk engine", True),
        ([*serve, model, "--precision", junk], "serve: junk precision", True),
        ([*serve, model, "--device", pick(rng, ["cuda:99", "gpu", ""])], "serve: a device that is not there", True),
        ([*chat, "--device", pick(rng, ["cuda:99", "gpu", ""])], "chat: a device that is not there", True),
        ([*serve, none, "--adapter", "="], "serve: empty adapter", True),
        ([*chat, "--temperature", number], f"chat: temperature {number}", False),
        ([*chat, "--top-k", pick(rng, ["-4", "x"])], "chat: junk top-k", False),
        ([*chat, "--precision", junk], "chat: junk precision", True),
        (["demo", pick(rng, ["--steps", "--rows"]), pick(rng, ["x", "1.5", "", "ten"])], "demo: junk number",
         True),
        (["demo", "--bogus"], "demo: unknown option", True),
    ]
    case.argv, case.label, case.must_fail = pick(rng, choices)
    assert case.argv[0] not in ("serve", "demo") or case.must_fail, "serve and demo must stop before they start"


# ---- (c) data sources ------------------------------------------------------------------------

def sentence(rng: random.Random, words: int) -> str:
    return " ".join(pick(rng, WORDS) for _ in range(words))


def good_rows(rng: random.Random, count: int) -> list[dict]:
    return [{"question": f"What is {sentence(rng, 4)} number {i}?", "answer": f"{sentence(rng, 3)} {i}."}
            for i in range(count)]


def junk_rows(rng: random.Random, rows: list[dict], shape: str) -> tuple[list, str]:
    """Good rows with a few made wrong: a field's value, a missing field, a row that is not an object."""
    rows, labels = [dict(r) for r in rows], []
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(rows))
        kind = pick(rng, ["value", "value", "value", "missing", "extra", "not an object", "broken chat"])
        row = rows[index] = rows[index] if isinstance(rows[index], dict) else {}  # was made a scalar above
        if kind == "value":
            key, value = pick(rng, list(row) or ["question"]), pick(rng, TEXT_JUNK)
            row[key] = value
            labels.append(f"row {index + 1} {key}={abridge(value, 30)}")
        elif kind == "missing" and row:
            key = pick(rng, list(row))
            del row[key]
            labels.append(f"row {index + 1} without {key}")
        elif kind == "extra":
            key = pick(rng, ["messages", "text", "conversations", "", "\x00", "question "])
            row[key] = pick(rng, TEXT_JUNK)
            labels.append(f"row {index + 1} with an extra key")
        elif kind == "not an object":
            rows[index] = pick(rng, [5, "row", None, [1, 2], True])
            labels.append(f"row {index + 1} is {abridge(rows[index], 20)}")
        else:
            rows[index] = pick(rng, chat_junk())
            labels.append(f"row {index + 1} a broken chat")
    return rows, f"{shape} rows, " + ", ".join(labels)


def chat_junk() -> list[dict]:
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    return [{"messages": []}, {"messages": "hi"}, {"messages": [user]},
            {"messages": [user, {"role": "robot", "content": "x"}]},
            {"messages": [user, {"role": "assistant", "content": 5}]},
            {"messages": [user, {"role": "assistant"}]},
            {"messages": [user, {"role": "assistant", "content": "  "}]}, {"messages": [bot, user]},
            {"messages": [user, {"role": None, "content": "x"}]}, {"messages": [[user, bot]]},
            {"messages": [user, {"role": "assistant", "content": ["a"]}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
            {"conversations": [{"from": 5, "value": "hi"}]}, {"conversations": [{"from": "human"}]},
            {"conversations": "x"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ["a"]}]},
            {"messages": [user, bot], "conversations": 5}]


def json_text(rows) -> str:
    return json.dumps(rows, allow_nan=True)  # NaN and Infinity as Python writes them


def write_json_like(rng: random.Random, folder: Path, kind: str) -> tuple[Path, str, bool]:
    rows, label = junk_rows(rng, good_rows(rng, rng.randint(4, 24)), "qa")
    if rng.random() < 0.25:
        rows, label = [pick(rng, chat_junk()) for _ in range(rng.randint(1, 6))], "chat rows, all broken"
    name = "data.json" if kind == "json" else pick(rng, ["data.jsonl", "data.ndjson", "data.txt", "data"])
    if kind == "json":
        text = pick(rng, [json_text(rows)] * 4 + [json_text({"rows": rows}), json_text(5), json_text("x"),
                                                  json_text(rows) + "\n" + json_text(rows), json_text([rows])])
    else:
        text = "\n".join(json_text(r) for r in rows) + pick(rng, ["\n", "", "\n\n\n", "\n["])
    if rng.random() < 0.04:
        text = pick(rng, ["[" * 5000 + "]" * 5000, json_text(rows)[:-1] + ", " + "[" * 5000])
    raw = text.encode("utf-8", "surrogatepass")
    must_fail = text.startswith("[" * 100) or text.endswith(("[" * 100, "\n["))
    damaged = ""
    if rng.random() < 0.35:
        raw, damaged = damage(rng, raw)
        label, must_fail = f"{label}; bytes {damaged}", must_fail or damaged in ("invalid UTF-8", "NUL byte")
    if name.endswith(".txt"):  # JSON that does not parse in a .txt file is prose: a legal document
        must_fail = damaged == "invalid UTF-8"
    path = folder / name
    path.write_bytes(raw)
    return path, label, must_fail


def write_table(rng: random.Random, folder: Path, kind: str) -> tuple[Path, str, bool, list[str]]:
    separator = "\t" if kind == "tsv" else ","
    rows, label = junk_rows(rng, good_rows(rng, rng.randint(4, 20)), kind)
    header = pick(rng, [["question", "answer"], ["question", "answer", "question"], ["", "answer"], ["q", "a"],
                        ["question"], ["question", "answer", "extra"], ["\ufeffquestion", "answer"]])
    lines = [separator.join(header)]
    for row in rows:
        cells = [str(row.get(h, "")) if isinstance(row, dict) else str(row) for h in header]
        cells = pick(rng, [cells, cells, cells, cells[:1], cells + ["spill"], ['"' + cells[0]]])
        lines.append(separator.join(cells))
    text = "\n".join(lines) + "\n"
    text = pick(rng, [text, text, text, text.replace(separator, pick(rng, [";", "|", separator * 2])),
                      header[0] + "\n", text + '"unclosed, quote\n', text.replace("\n", "\r\n")])
    raw, must_fail = text.encode("utf-8", "surrogatepass"), False
    if rng.random() < 0.3:
        raw, damaged = damage(rng, raw)
        label, must_fail = f"{label}; bytes {damaged}", damaged == "invalid UTF-8"
    path = folder / f"data.{kind}"
    path.write_bytes(raw)
    columns = []
    if rng.random() < 0.3:
        columns = ["--data.columns.question", pick(rng, ["q", "question", "Missing", ""]),
                   "--data.columns.answer", pick(rng, ["a", "answer", "extra"])]
    return path, f"{label}; header {header}", must_fail, columns


def parquet_answers(rng: random.Random, count: int):
    import pyarrow as pa

    return pick(rng, [
        ("ints", lambda: pa.array(list(range(count)))), ("NaN", lambda: pa.array([float("nan")] * count)),
        ("nulls", lambda: pa.array([None] * count, pa.string())),
        ("lists", lambda: pa.array([["a", "b"]] * count)),
        ("structs", lambda: pa.array([{"x": 1}] * count)), ("binary", lambda: pa.array([b"\xff\x00"] * count)),
        ("timestamps", lambda: pa.array([datetime.datetime(2020, 1, 1)] * count)),
        ("empty strings", lambda: pa.array([""] * count)),
        ("dictionary", lambda: pa.array(["a"] * count).dictionary_encode()),
        ("text", lambda: pa.array([f"a {i}" for i in range(count)])),
        ("decimals", lambda: pa.array([decimal.Decimal("1.50")] * count, pa.decimal128(5, 2))),
        ("maps", lambda: pa.array([[("k", "v")]] * count, pa.map_(pa.string(), pa.string()))),
    ])


def write_parquet(rng: random.Random, folder: Path) -> tuple[Path, str, bool]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = rng.randint(0, 12)
    kind, answers = parquet_answers(rng, count)
    questions = pa.array([f"q {sentence(rng, 3)} {i}" for i in range(count)])
    path = folder / pick(rng, ["data.parquet", "data.pq", "data"])
    table = pa.table({"question": questions, "answer": answers()}) if rng.random() < 0.85 else pa.table({})
    pq.write_table(table, path)
    label, must_fail = f"Parquet: {count} rows, answers {kind}", count == 0
    if rng.random() < 0.35:
        raw, name = pick(rng, [(path.read_bytes()[: rng.randrange(4, 200)], "truncated"),
                               (b"PAR1" + bytes(rng.randrange(256) for _ in range(64)) + b"PAR1", "random body"),
                               (b"question,answer\nq,a\n", "CSV inside"), (b"", "empty")])
        path.write_bytes(raw)
        label, must_fail = f"Parquet: {name}", True
    return path, label, must_fail


HTML_BODIES = [
    ("page with headings", "<h1>Q one</h1><p>answer one</p><h2>Q two</h2><p>answer two</p>"),
    ("no tags", "just words, no markup"), ("script only", "<script>alert(1)</script><style>p{}</style>"),
    ("nav only", "<nav>menu</nav><footer>foot</footer>"),
    ("deep nesting", "<div>" * 3000 + "deep" + "</div>" * 3000),
    ("unclosed tags", "<p><b><i>open <table><tr><td>cell"),
    ("bad entities", "<p>&#xD800; &#0; &#99999999; &bogus; &amp</p>"),
    ("empty headings", "<h1></h1><h2> </h2><h3></h3>"),
    ("comments", "<!-- <p>hidden</p> --><p>shown</p><!-- unclosed"),
    ("CDATA and PI", "<![CDATA[x]]><?php echo 1 ?><p>text</p>"),
    ("huge attribute", f"<p title='{'x' * 100000}'>t</p>"),
    ("headings in a form", "<form><h1>Q</h1><p>A</p></form>"), ("only whitespace", "<p> \u00a0 \u200b </p>"),
    ("many articles", "<article><h1>a</h1></article>" * 3 + "<main></main>"),
]


def write_html(rng: random.Random, folder: Path) -> tuple[Path, str, bool, list[str]]:
    name, body = pick(rng, HTML_BODIES)
    html = pick(rng, [f"<html><head><title>{sentence(rng, 2)}</title></head><body>{body}</body></html>", body])
    raw, label, must_fail = html.encode("utf-8"), f"HTML: {name}", html == body and name == "no tags"
    if rng.random() < 0.3:
        raw, damaged = damage(rng, raw)
        label, must_fail = f"{label}; bytes {damaged}", damaged == "invalid UTF-8"
    path = folder / pick(rng, ["page.html", "page.htm", "page.xhtml"])
    path.write_bytes(raw)
    split = pick(rng, ["page", "headings"])
    options = ["--data.html_split", split]
    if split == "headings":
        options += ["--data.columns.question", "heading", "--data.columns.answer", "body"]
    return path, f"{label}; html_split {split}", must_fail, options


SQLITE_QUERIES = ["SELECT question, answer FROM qa", "SELECT", "DELETE FROM qa", "SELECT * FROM missing",
                  "PRAGMA table_info(qa)", "SELECT 1/0", "SELECT zeroblob(10) AS question, 'x' AS answer",
                  "ATTACH 'x.db' AS y", "VACUUM INTO 'copy.db'", "SELECT load_extension('x')",
                  "SELECT question, question FROM qa", "CREATE TABLE z (a)", "SELECT; SELECT", "VACUUM",
                  "SELECT ?"]


def write_sqlite(rng: random.Random, folder: Path) -> tuple[Path, str, bool, list[str]]:
    path = folder / pick(rng, ["data.db", "data.sqlite", "data.sqlite3", "data"])
    connection = sqlite3.connect(path)
    tables = pick(rng, [["qa"], ["qa"], ["qa", "other"], [], ['we"ird']])
    values = pick(rng, [("text", lambda i: f"a {i}"), ("blobs", lambda i: b"\xff\x00"),
                        ("nulls", lambda i: None), ("ints", lambda i: i),
                        ("infinite reals", lambda i: 1e308 * 10), ("empty", lambda i: "")])
    for table in tables:
        name = table.replace('"', '""')
        connection.execute(f'CREATE TABLE "{name}" (question TEXT, answer)')
        connection.executemany(f'INSERT INTO "{name}" VALUES (?, ?)',
                               [(f"q {sentence(rng, 3)} {i}", values[1](i)) for i in range(rng.randint(0, 10))])
    connection.commit()
    connection.close()
    options = pick(rng, [[], [], ["--data.table", pick(rng, ["qa", "missing", 'x"; DROP TABLE qa; --', "",
                                                             "sqlite_master"])],
                         ["--data.query", pick(rng, SQLITE_QUERIES)]])
    label = f"SQLite: tables {tables}, answers {values[0]}, options {options}"
    if rng.random() < 0.3:
        raw, damaged = damage(rng, path.read_bytes())
        path.write_bytes(raw)
        label = f"{label}; bytes {damaged}"
    return path, label, False, options


def sql_dumps(rng: random.Random) -> list[tuple[str, str]]:
    create = "CREATE TABLE qa (question TEXT, answer TEXT);\n"
    inserts = "".join(f"INSERT INTO qa VALUES ('q {sentence(rng, 3)} {i}', 'a {i}');\n" for i in range(5))
    mysql = ("CREATE TABLE `qa` (`question` text, `answer` text) ENGINE=InnoDB;\n"
             "INSERT INTO `qa` VALUES ('it\\'s', 'a\\\\'),('x\\0', 'y');\nLOCK TABLES `qa` WRITE;\n")
    trigger = "CREATE TRIGGER t AFTER INSERT ON qa BEGIN SELECT RAISE(ABORT, 'no'); END;\n"
    return [("unclosed quote", create + "INSERT INTO qa VALUES ('q, 'a);\n"),
            ("ATTACH", "ATTACH DATABASE 'x.db' AS x;\n" + create + inserts),
            ("VACUUM INTO", create + inserts + "VACUUM INTO 'copy.db';\n"), ("mysql", mysql),
            ("comments only", "-- nothing\n/* at all */\n"), ("insert without table", inserts),
            ("no inserts", create), ("syntax error", create + "INSERT INTO qa VALUE S ('a');\n"),
            ("two tables", create + "CREATE TABLE b (x);\n" + inserts),
            ("transaction", "BEGIN TRANSACTION;\n" + create + inserts), ("trigger", create + trigger + inserts),
            ("pragma", "PRAGMA writable_schema=ON;\n" + create + inserts),
            ("load_extension", create + "SELECT load_extension('x');\n"),
            ("dangling backslash", create + "INSERT INTO qa VALUES ('a\\', 'b');\n"),
            ("huge statement", create + "INSERT INTO qa VALUES ('" + "x" * 200000 + "', 'a');\n"),
            ("good", create + inserts), ("unterminated comment", create + "/* never closed\n" + inserts),
            ("semicolons", ";;;\n;" + create + inserts)]


def write_sql_dump(rng: random.Random, folder: Path) -> tuple[Path, str, bool, list[str]]:
    name, text = pick(rng, sql_dumps(rng))
    raw, label = text.encode("utf-8"), f"SQL dump: {name}"
    if rng.random() < 0.3:
        raw, damaged = damage(rng, raw)
        label = f"{label}; bytes {damaged}"
    path = folder / "dump.sql"
    path.write_bytes(raw)
    options = pick(rng, [[], ["--data.table", "qa"],
                         ["--data.query", pick(rng, ["SELECT * FROM qa", "SELECT", "DROP TABLE qa"])]])
    return path, label, name in ("unclosed quote", "comments only", "syntax error"), options


TEXT_FILES = [("doc.txt", b"some words for a document"), ("empty.txt", b""), ("blank.md", b" \n\n "),
              ("latin.txt", "café".encode("latin-1")), ("braces.txt", b'{"question": "q", "answer": '),
              ("rows.txt", b'{"question": "q", "answer": 5}\n[1]\n'), (".hidden.txt", b"secret"),
              ("nul.md", b"a\x00b"), ("deep/sub/doc.rst", b"nested text"), ("bin.txt", bytes(range(256))),
              ("data.json", b"[1, 2]"), ("page.html", b"<p>hello</p>"), ("table.csv", b"a,b\n1\n")]


def write_text_folder(rng: random.Random, folder: Path) -> tuple[Path, str, bool]:
    root = folder / "corpus"
    root.mkdir()
    kinds = []
    for number in range(rng.randint(0, 4)):
        name, raw = pick(rng, TEXT_FILES)
        path = root / (name if name.startswith(".") or "/" in name else f"{number}-{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        kinds.append(name)
    if rng.random() < 0.15:
        (root / "loop").symlink_to(root, target_is_directory=True)
        kinds.append("a symlink loop")
    if rng.random() < 0.1:
        (root / "gone.txt").symlink_to(root / "nowhere.txt")
        kinds.append("a dangling symlink")
    visible = [k for k in kinds if not k.startswith((".", "a "))]
    return root, f"folder: {kinds or 'empty'}", not visible


def write_datasets_folder(rng: random.Random, folder: Path) -> tuple[Path, str, bool]:
    root = folder / "dataset"
    kind = pick(rng, ["junk markers", "marker only", "real, odd types", "real, no train split",
                      "real, cut arrow"])
    if kind in ("junk markers", "marker only"):
        root.mkdir()
        junk = pick(rng, [b"{", b"[]", b'{"_data_files": [{"filename": "../x"}]}', b"\xff"])
        marker = pick(rng, ["dataset_info.json", "state.json", "dataset_dict.json"])
        (root / marker).write_bytes(b"" if kind == "marker only" else junk)
        return root, f"datasets folder: {kind} ({marker})", True
    import datasets

    values = pick(rng, [[1, 2, 3], [None, None, None], [["a"], ["b"], []], ["", " ", "x"]])
    table = datasets.Dataset.from_dict({"question": ["q one", "q two", "q three"], "answer": values})
    if kind == "real, no train split":
        datasets.DatasetDict({"a": table, "b": table}).save_to_disk(str(root))
        return root, f"datasets folder: {kind}", True
    table.save_to_disk(str(root))
    if kind == "real, cut arrow":
        arrow = next(root.glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[:40])
    return root, f"datasets folder: {kind}, answers {values}", kind == "real, cut arrow"


def data_case(rng: random.Random, fixture: Fixture, case: Case, verb: str) -> None:
    options = []
    kind = pick(rng, ["json", "jsonl", "jsonl", "csv", "tsv", "parquet", "html", "sqlite", "sql", "text",
                      "datasets"])
    if kind in ("json", "jsonl"):
        path, label, must_fail = write_json_like(rng, case.folder, kind)
    elif kind in ("csv", "tsv"):
        path, label, must_fail, options = write_table(rng, case.folder, kind)
    elif kind == "parquet":
        path, label, must_fail = write_parquet(rng, case.folder)
    elif kind == "html":
        path, label, must_fail, options = write_html(rng, case.folder)
    elif kind == "sqlite":
        path, label, must_fail, options = write_sqlite(rng, case.folder)
    elif kind == "sql":
        path, label, must_fail, options = write_sql_dump(rng, case.folder)
    elif kind == "text":
        path, label, must_fail = write_text_folder(rng, case.folder)
        options = ["--data.format", "text"] if rng.random() < 0.7 else []
    else:
        path, label, must_fail = write_datasets_folder(rng, case.folder)
    if rng.random() < 0.15:
        forced = pick(rng, ["qa", "messages", "sharegpt", "text", "alpaca", "prompt_completion"])
        options += ["--data.format", forced]
    guarded = verb == "prepare" and rng.random() < 0.3  # over the existing run: a refusal must not touch it
    case.run_dir = fixture.good_run if guarded else case.folder / "run"
    case.guard = fixture.good_run if guarded else None
    case.argv = [verb, "--model", str(fixture.model), "--data.path", str(path), "--out_dir", str(case.run_dir),
                 "--data.max_seq_length", "64", *options]
    case.label, case.must_fail = f"{verb} {kind}: {label}", must_fail
    case.shown = abridge(shown_input(path), 200) + (f"  options {options}" if options else "")


def shown_input(path: Path) -> str:
    if path.is_dir():
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_symlink())
        return f"{path.name}/: " + ", ".join(names[:8])
    return repr(path.read_bytes()[:160])


# ---- running CLI cases in-process ------------------------------------------------------------

class Hang(BaseException):
    """Raised by the watchdog inside a case that runs too long (BaseException: no handler eats it)."""


def _on_alarm(*_):
    raise Hang()


def call_cli(argv: list[str], seconds: int) -> tuple[int | None, str, str, str]:
    """(exit code, stdout, stderr, traceback or 'hang') of `tunesmith ARGV`, in this process."""
    from tunesmith import cli

    out, err, crash, code = io.StringIO(), io.StringIO(), "", None
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    stdin, sys.stdin = sys.stdin, io.StringIO("")  # chat reads an immediate end of input
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as stop:  # argparse's own exit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Hang:
        crash = "hang"
    except Exception:  # noqa: BLE001 — the very thing being counted
        crash = traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.stdin = stdin
    return code, out.getvalue(), err.getvalue(), crash


def one_line_refusal(err: str) -> bool:
    return ERROR_LINE.match(last_line(err)) is not None


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing on stderr)"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stray_files(case: Case) -> list[str]:
    """Temporary files anywhere the case wrote, and anything in the working folder (which is then
    emptied again for the next case)."""
    found = []
    for folder in (case.folder, case.guard):
        if folder and folder.is_dir():
            temporary = [p for p in folder.rglob("*") if re.search(r"\.tmp|\.partial", p.name)]
            found += [f"temporary file left: {p}" for p in temporary]
    for path in sorted(Path.cwd().iterdir()):
        found.append(f"file written in the working folder: {path.name}")
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return found


def written_problems(case: Case, fixture: Fixture, accepted: bool) -> list[str]:
    """What a refused (or accepted) case left on disk that it should not have."""
    problems = stray_files(case)
    if accepted:
        done = {"prepare": "data/manifest.json", "inspect": "inspect.md"}.get(case.argv[0])
        if done and case.run_dir and not (case.run_dir / done).is_file():
            problems.append(f"exit 0 without {done}")
        if case.guard:
            fixture.snapshot = snapshot(case.guard)  # replaced, legitimately
    elif case.guard:
        now = snapshot(case.guard)
        before = fixture.snapshot
        changed = sorted(name for name in set(now) | set(before) if now.get(name) != before.get(name))
        if changed:
            problems.append(f"the existing run changed: {changed[:4]}")
            fixture.snapshot = now
    elif case.run_dir and case.run_dir.is_dir():
        inside = sorted(str(p.relative_to(case.run_dir)) for p in case.run_dir.rglob("*"))
        problems.append(f"run folder left behind: {inside[:5] or 'empty'}")
    return problems


def only_prepared_data(run_dir: Path | None) -> bool:
    """The run folder holds nothing but a complete prepared data folder (its manifest is written last)."""
    if run_dir is None or not run_dir.is_dir():
        return False
    entries = list(run_dir.iterdir())
    return [e.name for e in entries] == ["data"] and (run_dir / "data" / "manifest.json").is_file()


def run_cli_case(case: Case, fixture: Fixture, seconds: int) -> Outcome:
    code, out, err, crash = call_cli(case.argv, seconds)
    problems, detail = [], ""
    if crash == "hang":
        problems.append("hang")
        detail = f"still running after {seconds} s"
    elif crash:
        problems.append("traceback")
        detail = crash.strip().splitlines()[-1]
    elif TRACEBACK in out + err:
        problems.append("traceback")
        detail = last_line(out + err)
    accepted = code == 0
    if code is not None and not accepted:
        detail = detail or f"exit {code}: {abridge(last_line(err), 200)}"
        if code != 2:
            problems.append("exit code")
        if not one_line_refusal(err):
            problems.append("message")
    if accepted and case.must_fail:
        problems.append("bad input taken")
    written = written_problems(case, fixture, accepted)
    if written:
        left_data = len(written) == 1 and not case.guard and only_prepared_data(case.run_dir)
        problems.append("left data" if left_data else "half-written")
        detail = "; ".join(written) + (f" ({detail})" if detail else "")
    result = "accepted" if accepted else "refused"
    return Outcome(case, result, sorted(set(problems), key=PROBLEMS.index), detail or f"exit {code}")


# ---- (d) the server --------------------------------------------------------------------------

class Server:
    """`tunesmith serve` in its own process on a free port; its stderr is collected line by line."""

    def __init__(self, model: Path, work: Path):
        command = [sys.executable, "-m", "tunesmith", "serve", "--model", str(model), "--port", "0",
                   "--api-key", API_KEY, "--max-tokens", "32", "--default-max-tokens", "8",
                   "--max-prompt-tokens", "200", "--max-batch-size", "8", "--max-queue", "16", "--threads", "1",
                   "--precision", "fp32", "--device", "cpu", "--max-body-bytes", str(MAX_BODY_BYTES)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        cwd=work, env=dict(os.environ), errors="replace")
        self.lines: list[str] = []
        self.claimed: set[int] = set()  # error lines already tied to a request
        self.ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.host, self.port, self.model_names = "127.0.0.1", 0, []

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("Serving "):
                self.ready.put(line)
        self.ready.put(None)

    def wait(self, seconds: float = 300) -> None:
        line = self.ready.get(timeout=seconds)
        if line is None:
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-20:]))
        address = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.port = int(address.rsplit(":", 1)[1].split("/")[0])
        _, body = self.plain("GET", "/v1/models")
        self.model_names = [m["id"] for m in json.loads(body)["data"]]

    def plain(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
            connection.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def answers_a_good_request(self) -> bool:
        try:
            if self.process.poll() is not None or self.plain("GET", "/health")[0] != 200:
                return False
            return self.plain("POST", "/v1/chat/completions", good_chat(self.model_names[0]))[0] == 200
        except OSError:
            return False

    def errors_since(self, mark: int) -> list[str]:
        """Error lines logged from line `mark` on, now tied to the request being judged."""
        found = [i for i in range(mark, len(self.lines)) if any(m in self.lines[i] for m in SERVER_ERRORS)]
        self.claimed.update(found)
        return [self.lines[i].rstrip() for i in found]

    def unclaimed_errors(self) -> list[str]:
        return [line.rstrip() for i, line in enumerate(self.lines)
                if i not in self.claimed and any(m in line for m in SERVER_ERRORS)]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def good_chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 4}


def good_completion(model: str) -> dict:
    return {"model": model, "prompt": "the quick brown fox", "max_tokens": 4}


REQUEST_FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n",
                  "stop", "seed", "stream", "stream_options", "logprobs", "presence_penalty", "frequency_penalty",
                  "max_completion_tokens", "tools", "prompt", "echo", "suffix", "user"]
REQUEST_JUNK = [None, True, False, -1, 0, 1.5, -1.5, 10 ** 30, -(10 ** 30), 2 ** 63, 2 ** 64, 1e308, -1e308,
                1e-320, 1e-45, "x", "", "10", [], {}, [None], [1], ["a"] * 10, {"a": 1}, [[1, 2]], ["\ud800"],
                "\x00", float("nan"), float("inf"), float("-inf")]
MESSAGES_JUNK = [[], "hi", [5], [{"content": "x"}], [{"role": "tool", "content": "x"}],
                 [{"role": "assistant", "content": "x"}], [{"role": "user", "content": [5]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                 [{"role": "user", "content": "\ud800"}], [{"role": 5, "content": "x"}],
                 [{"role": "user", "content": {}}], [{"role": "system", "content": "s"}],
                 [{"role": "user", "content": "x " * 5000}]]
LEGAL_MESSAGES = [[{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": ""}],
                  [{"role": "user", "content": "\x00" * 50}]]
PROMPT_JUNK = ["", [], [""], ["a"] * 40, [[1, 2]], "\ud800", "x " * 5000, ["ok", 5]]


def serve_case(rng: random.Random, server: Server, case: Case) -> None:
    model, chat = server.model_names[0], rng.random() < 0.6
    path, body = ("/v1/chat/completions", good_chat(model)) if chat else \
        ("/v1/completions", good_completion(model))
    kind = pick(rng, ["field junk"] * 4 + ["raw body", "raw body", "messages", "missing", "lengths", "stop",
                                           "stop", "model", "auth", "http", "oversize", "stream"])
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    request = HttpCase("POST", path, headers=headers)
    label, case.must_fail = request_mutation(rng, kind, body, request, chat)
    if request.body is None:
        request.body = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    case.request = request
    case.label = f"{request.method} {request.path}: {label}"
    case.shown = abridge(request.body.decode("utf-8", "replace"), 200)


def request_mutation(rng: random.Random, kind: str, body: dict, request: HttpCase, chat: bool
                     ) -> tuple[str, bool]:
    """Make the good request wrong in one way of `kind`; (what changed, whether it is certainly refused)."""
    if kind == "field junk":
        changes = []
        for _ in range(rng.randint(1, 3)):
            name, value = pick(rng, REQUEST_FIELDS), pick(rng, REQUEST_JUNK)
            body[name] = value
            changes.append(f"{name}={abridge(value, 30)}")
        return "junk " + ", ".join(changes), False
    if kind == "raw body":
        good = json.dumps(body).encode()
        raw = pick(rng, [b"", b"{", b"[]", b"null", b"5", b'"x"', b'{"model":', b"\xff\xfe{}", b"\x00" * 10,
                         b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"\xef\xbb\xbf" + good,
                         good + b"trailing", b'{"model": NaN}', good[:-3]])
        request.body = raw
        return f"raw body {abridge(raw, 40)}", raw != b"\xef\xbb\xbf" + good
    if kind == "messages":
        key, value = ("messages", pick(rng, MESSAGES_JUNK + LEGAL_MESSAGES)) if chat else \
            ("prompt", pick(rng, PROMPT_JUNK + ["\x00"]))
        body[key] = value
        return f"{key}={abridge(value, 60)}", value not in LEGAL_MESSAGES and value != "\x00"
    if kind == "missing":
        gone = pick(rng, ["model", "messages" if chat else "prompt"])
        body.pop(gone, None)
        return f"no {gone}", True
    if kind == "lengths":
        name = pick(rng, ["max_tokens", "max_completion_tokens" if chat else "max_tokens", "n"])
        too_many = [0, -1, 17, 10 ** 9, 10 ** 30] if name == "n" else [-1, 0, -(10 ** 9), 33, 10 ** 9, 10 ** 30]
        body[name] = pick(rng, too_many)
        return f"{name}={body[name]}", True
    if kind == "stop":
        body["stop"] = pick(rng, ["", [""], ["a"] * 5, "x" * 300, [1], [["a"]], [None], {"a": 1}, 5, ["a", ""]])
        return f"stop={abridge(body['stop'], 40)}", True
    if kind == "model":
        body["model"] = pick(rng, ["nope", "", "../../etc/passwd", "x" * 10000, "\x00", "base/../x", 5, None])
        return f"model={abridge(body['model'], 40)}", True
    return request_transport(rng, kind, body, request)


def request_transport(rng: random.Random, kind: str, body: dict, request: HttpCase) -> tuple[str, bool]:
    if kind == "auth":
        value = pick(rng, [None, "", "Bearer", "Bearer ", f"bearer {API_KEY}", f"Bearer {API_KEY}x",
                           "Basic Zm9vOmJhcg==", f"Bearer  {API_KEY}", "Bearer \xe9\xe9"])
        if value is None:
            request.headers.pop("Authorization")
        else:
            request.headers["Authorization"] = value.encode("latin-1")
        return f"Authorization {value!r}", True
    if kind == "http":
        method, path, content_type = pick(rng, [
            ("GET", request.path, None), ("PUT", request.path, None), ("DELETE", "/v1/models", None),
            ("GET", "/v1/models/%00", None), ("GET", "/v1/models/" + "x" * 5000, None),
            ("POST", "/v1/embeddings", None), ("POST", request.path, "text/plain"),
            ("POST", request.path, "multipart/form-data"), ("POST", request.path + "?x=%ff", None),
            ("GET", "/../../etc/passwd", None), ("OPTIONS", request.path, None), ("POST", "/health", None)])
        request.method, request.path = method, path
        if content_type:
            request.headers["Content-Type"] = content_type
        legal = content_type == "text/plain" or "?" in path  # FastAPI may read JSON under any type
        return f"{method} {abridge(path, 40)} {content_type or ''}".strip(), not legal
    if kind == "oversize":
        way = pick(rng, ["declared", "chunked", "lying length", "short length"])
        request.body = json.dumps({**body, "pad": "x" * (MAX_BODY_BYTES + 10)} if way in ("declared", "chunked")
                                  else body).encode()
        request.chunked = way == "chunked"
        if way == "lying length":
            request.headers["Content-Length"] = str(len(request.body) + 1000)
            request.half_close = True
        if way == "short length":
            request.headers["Content-Length"] = str(max(1, len(request.body) // 2))
        return f"oversize body ({way})", True
    body["stream"] = True
    if rng.random() < 0.5:
        request.hang_up = True
        body["max_tokens"] = 32
        return "streamed, client hangs up", False
    bad = pick(rng, [0, [""], -1, {"include_usage": "x"}])
    body[pick(rng, ["n", "stop", "max_tokens", "stream_options"])] = bad
    return "streamed with a bad field", True


def send(server: Server, request: HttpCase) -> tuple[int | None, bytes, str]:
    """(status or None, body, what went wrong on the wire). A server that answers before it has read
    the whole body (413) may close the connection under the rest: the answer is still read."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    wire = ""
    try:
        connection.putrequest(request.method, request.path, skip_accept_encoding=True)
        headers = dict(request.headers)
        if request.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers.setdefault("Content-Length", str(len(request.body)))
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            send_body(connection, request)
        except OSError as err:
            wire = f"{type(err).__name__} while sending"
        response = connection.getresponse()
        data = response.read(64) if request.hang_up else response.read()
        return response.status, data, wire
    except (OSError, http.client.HTTPException) as err:
        return None, b"", f"{wire + '; ' if wire else ''}{type(err).__name__}: {err}"
    finally:
        connection.close()


def send_body(connection: http.client.HTTPConnection, request: HttpCase) -> None:
    step = 1 << 16
    for start in range(0, len(request.body), step):
        piece = request.body[start: start + step]
        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece) if request.chunked else piece)
    if request.chunked:
        connection.send(b"0\r\n\r\n")
    if request.half_close:
        connection.sock.shutdown(socket.SHUT_WR)


def run_serve_case(case: Case, server: Server) -> Outcome:
    mark = len(server.lines)
    status, body, wire = send(server, case.request)
    time.sleep(0.05)  # let the server's log of this request arrive
    logged = server.errors_since(mark)
    problems, detail = [], f"{status}: {abridge(body.decode('utf-8', 'replace'), 200)}" if status else wire
    if logged:
        problems.append("traceback")
        detail = f"server log: {logged[-1]} ({detail})"
    if TRACEBACK.encode() in body:
        problems.append("traceback")
    if (status or 0) >= 500 or b'"server_error"' in body:  # the second: an error event inside a 200 stream
        problems.append("5xx")
    if status is not None and 400 <= status < 500 and not error_body(body):
        problems.append("error body")
    if status is not None and status < 300 and case.must_fail:
        problems.append("bad input taken")
    if status is None and not server.answers_a_good_request():
        problems.append("server down")
    result = "no answer" if status is None else ("accepted" if status < 300 else "refused")
    return Outcome(case, result, sorted(set(problems), key=PROBLEMS.index), detail)


def error_body(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


# ---- the run ---------------------------------------------------------------------------------

def plan(cases: int) -> list[tuple[str, int]]:
    """(surface, number within the surface) of every case, surfaces in order."""
    out = []
    for index, (surface, share) in enumerate(SHARES.items()):
        count = cases - len(out) if index == len(SHARES) - 1 else round(cases * share)
        out += [(surface, n) for n in range(count)]
    return out


def build_fixture(work: Path, tiny) -> Fixture:
    model = tiny.make_model(work / "tiny-llama", "llama", chat=True)
    good_data = tiny.write_jsonl(work / "good.jsonl", good_rows(random.Random(0), 24))
    fixture = Fixture(work, model, good_data, work / "good-run")
    code, _, err, crash = call_cli(["prepare", "--model", str(model), "--data.path", str(good_data), "--out_dir",
                                    str(fixture.good_run), "--data.max_seq_length", "64"], 300)
    if code != 0:
        raise RuntimeError(f"preparing the good run failed:\n{err}\n{crash}")
    fixture.snapshot = snapshot(fixture.good_run)
    return fixture


def make_case(seed: int, surface: str, number: int, index: int, fixture: Fixture, server: Server | None
              ) -> Case:
    folder = fixture.work / "cases" / f"{index:04d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    case = Case(index, surface, folder)
    if surface == "data":  # prepare and inspect see the same input: cases 2k and 2k+1 of the surface
        verb = ("prepare", "inspect")[number % 2]
        data_case(random.Random(f"{seed}:data:{number // 2}"), fixture, case, verb)
        return case
    rng = random.Random(f"{seed}:{surface}:{number}")
    if surface == "config":
        config_case(rng, fixture, case)
    elif surface == "cli":
        cli_case(rng, fixture, case)
    else:
        serve_case(rng, server, case)
    return case


def run_all(args, fixture: Fixture, server: Server | None, cases: list[tuple[int, str, int]]) -> list[Outcome]:
    outcomes, started = [], time.monotonic()
    for index, surface, number in cases:
        case = make_case(args.seed, surface, number, index, fixture, server)
        start = time.monotonic()
        if surface == "serve":
            outcome = run_serve_case(case, server)
        else:
            outcome = run_cli_case(case, fixture, args.case_seconds)
        outcome.seconds = time.monotonic() - start
        outcomes.append(outcome)
        if outcome.problems or args.only is not None:
            say_case(outcome, verbose=args.only is not None)
        if not outcome.problems and not args.keep:
            shutil.rmtree(case.folder, ignore_errors=True)
        if len(outcomes) % 50 == 0 or len(outcomes) == len(cases):
            failing = sum(1 for o in outcomes if o.problems)
            print(f"  {len(outcomes)}/{len(cases)} cases, {failing} with problems, "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return outcomes


def say_case(outcome: Outcome, verbose: bool = False) -> None:
    case = outcome.case
    problems = ", ".join(outcome.problems) or "ok"
    print(f"  case {case.index} [{case.surface}] {problems}: {abridge(case.label, 200)}\n"
          f"      -> {abridge(outcome.detail, 300)}", file=sys.stderr, flush=True)
    if verbose:
        print(f"      argv: {case.argv}\n      input: {case.shown}\n      {outcome.seconds:.1f} s",
              file=sys.stderr)


def summary(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    table = {}
    for surface in SHARES:
        mine = [o for o in outcomes if o.case.surface == surface]
        row = {"cases": len(mine), **{kind: sum(o.result == kind for o in mine)
                                      for kind in ("refused", "accepted", "no answer")}}
        row.update({problem: sum(problem in o.problems for o in mine) for problem in PROBLEMS})
        table[surface] = row
    table["total"] = {key: sum(row[key] for row in table.values()) for key in next(iter(table.values()))}
    return table


def signature(outcome: Outcome) -> str:
    """What makes two failures the same defect: the problems and the detail without paths and numbers."""
    detail = re.sub(r"\d+", "N", re.sub(r"(/[^\s/:'\"]+)+", "PATH", outcome.detail))
    return f"{outcome.case.surface} {outcome.problems} {detail[:70]}"


def failure_lines(outcomes: list[Outcome], show: int, work: Path) -> list[str]:
    """The first failing input of each kind of failure, with how many cases failed that way."""
    kinds: dict[str, list[Outcome]] = {}
    for outcome in (o for o in outcomes if o.problems):
        kinds.setdefault(signature(outcome), []).append(outcome)
    def shown(text: str, limit: int) -> str:
        return md(abridge(text.replace(str(work), "$WORK"), limit))

    lines = []
    for same in list(kinds.values())[:show]:
        first, case = same[0], same[0].case
        count = f"{len(same)} case{'s' * (len(same) > 1)}, first {case.index}, {case.surface}"
        given = " ".join(case.argv) if case.argv else case.shown
        lines.append(f"- {', '.join(first.problems)} ({count}): {shown(case.label, 150)} — `{shown(given, 150)}` "
                     f"→ {shown(first.detail, 220)}")
    return lines


def report(args, table: dict, outcomes: list[Outcome], seconds: float, server_tail: list[str],
           alive: bool | None) -> list[str]:
    columns = [p for p in PROBLEMS if table["total"][p] or p in ("traceback", "5xx", "half-written")]
    head = "| surface | cases | refused | accepted | " + " | ".join(columns) + " |"
    failing = [o for o in outcomes if o.problems]
    kinds = len({signature(o) for o in failing})
    lines = ["## Fuzzing: generated bad inputs on every surface (bench/fuzz.py)", "",
             f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
             f"- Command: `OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python {' '.join(shown_argv())}`",
             (f"- Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{seconds / 60:.1f} min for {len(outcomes)} cases"),
             ("- Refused: an exit code other than 0, or an HTTP 4xx; accepted: exit 0 or a 2xx (many generated "
              "inputs are odd but legal). The columns after those count the cases with that problem; the "
              "target is 0 in each."), "",
             head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for surface, row in table.items():
        cells = [row["cases"], row["refused"], row["accepted"], *(row[p] for p in columns)]
        lines.append(f"| {surface} | " + " | ".join(str(c) for c in cells) + " |")
    if alive is not None:
        answered = "still answered" if alive else "NO LONGER answered"
        untied = f"{len(server_tail)} error lines in its log were not tied to a request"
        lines += ["", f"After the last request the server {answered} a good one; {untied}"
                      + (":" if server_tail else "."), *[f"    {md(line)}" for line in server_tail[:5]]]
    if not failing:
        return [*lines, "", "No failing inputs."]
    replay = f"`--seed {args.seed} --cases {args.cases} --only CASE`"
    heading = f"Failing inputs, the first of each of {kinds} kinds (up to {args.show}; replay one with {replay}):"
    return [*lines, "", heading, *failure_lines(outcomes, args.show, args.work)]


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def shown_argv() -> list[str]:
    script = Path(__file__).resolve()  # not sys.argv[0]: the run changes its working folder
    return [str(script.relative_to(REPO) if script.is_relative_to(REPO) else script), *sys.argv[1:]]


def write_results(path: Path, section: list[str]) -> None:
    from results_md import write_section  # bench/ is on the path of a script run from it

    write_section(path, "fuzz", section)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated inputs, shared out over the surfaces")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    parser.add_argument("--only", type=int, default=None, help="replay one case (its index), verbosely")
    parser.add_argument("--surfaces", default=",".join(SHARES), help="a comma-separated subset to run")
    parser.add_argument("--show", type=int, default=10, help="kinds of failure listed in the results")
    parser.add_argument("--case-seconds", type=int, default=120, help="watchdog of one in-process CLI case")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep every case's folder, not only failing ones")
    parser.add_argument("--write", action="store_true", help="write the summary into bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")
    sys.stderr.reconfigure(errors="backslashreplace")
    work = args.work = (args.work or Path(tempfile.mkdtemp(prefix="tunesmith-fuzz-"))).resolve()
    (work / "cwd").mkdir(parents=True, exist_ok=True)
    os.environ["TUNESMITH_CACHE"] = str(work / "cache")  # locks and caches stay in the scratch folder
    os.chdir(work / "cwd")  # relative paths in inputs resolve in an empty folder, watched for strays
    wanted = set(args.surfaces.split(","))
    cases = [(i, s, n) for i, (s, n) in enumerate(plan(args.cases)) if s in wanted]
    cases = [c for c in cases if args.only is None or c[0] == args.only]
    started = time.monotonic()
    print(f"Fuzzing {len(cases)} cases in {work} ...", file=sys.stderr, flush=True)
    fixture = build_fixture(work, load_tiny())
    server = Server(fixture.model, work / "cwd") if any(s == "serve" for _, s, _ in cases) else None
    alive = None
    try:  # the server loads while the CLI cases run
        outcomes = run_all(args, fixture, None, [c for c in cases if c[1] != "serve"])
        if server:
            server.wait()
            outcomes += run_all(args, fixture, server, [c for c in cases if c[1] == "serve"])
            alive = server.answers_a_good_request()
    finally:
        if server:
            server.stop()
    tail = server.unclaimed_errors() if server else []
    lines = report(args, summary(outcomes), outcomes, time.monotonic() - started, tail, alive)
    print("\n".join(lines))
    if args.write and args.only is None:
        write_results(RESULTS, lines)
        print(f"\nWrote {RESULTS}", file=sys.stderr)
    clean = not any(o.problems for o in outcomes) and not tail and alive is not False
    if clean and work.name.startswith("tunesmith-fuzz-") and not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # a temporary folder; kept when something failed
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
