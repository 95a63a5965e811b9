"""Shared fixtures: a private tunesmith cache per session, tiny models built once, and helpers to
run the CLI in-process or as a subprocess.

The embedded-model test opts back into the user's real cache (see `real_cache`), so the ~30 s
GGUF conversion is not redone on every run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a shared machine spinning OpenMP threads make
# each op wait for a busy core (10-100x slower); subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))

import tiny
import torch
from helpers import REAL_CACHE, CliResult

from tunesmith.train.flops import PEAK_FILE


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """TUNESMITH_CACHE points at a fresh folder for the session, seeded with a peak FLOP/s for this
    CPU (it only feeds the MFU figure) so that no run spends a second measuring it."""
    cache = tmp_path_factory.mktemp("tunesmith-cache")
    try:
        table = json.loads((REAL_CACHE / PEAK_FILE).read_text())
    except (OSError, ValueError):
        table = {}
    for dtype in ("torch.float32", "torch.bfloat16"):
        table.setdefault(f"cpu-{torch.get_num_threads()}/{dtype}", 1e11)
    (cache / PEAK_FILE).write_text(json.dumps(table))
    previous = os.environ.get("TUNESMITH_CACHE")
    os.environ["TUNESMITH_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("TUNESMITH_CACHE", None)
    else:
        os.environ["TUNESMITH_CACHE"] = previous


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(REAL_CACHE))
    return REAL_CACHE


class TinyModels:
    """Tiny random models, built on first use and shared by the whole session (read-only)."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[tuple[str, bool], Path] = {}

    def __call__(self, family: str = "llama", chat: bool = True) -> Path:
        key = (family, chat)
        if key not in self.built:
            folder = self.root / f"{family}-{'chat' if chat else 'plain'}"
            self.built[key] = tiny.make_model(folder, family, chat=chat)
        return self.built[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="session")
def tokenizer(llama):
    from tunesmith.model.load import load_tokenizer

    return load_tokenizer(llama, quiet=True)


@pytest.fixture(scope="session")
def plain_tokenizer(tiny_models):
    """The tiny tokenizer without a chat template (EOS <|endoftext|>)."""
    from tunesmith.model.load import load_tokenizer

    return load_tokenizer(tiny_models("llama", chat=False), quiet=True)


@pytest.fixture
def cli(capsys):
    """Run `tunesmith ARGS` in-process; returns its exit code, stdout and stderr."""
    from tunesmith.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
