"""Shared fixtures: a private tunesmith cache per session, tiny models built once, and helpers to
run the CLI in-process or as a subprocess.

The embedded-model test opts back into the user's real cache (see `real_cache`), so the ~30 s
GGUF conversion is not redone on every run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from helpers import REAL_CACHE, CliResult  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """TUNESMITH_CACHE points at a fresh folder for the session (seeded with the measured peak
    FLOP/s of this machine, which only feeds the MFU figure, to skip a 1 s measurement)."""
    cache = tmp_path_factory.mktemp("tunesmith-cache")
    if (REAL_CACHE / "peak_flops.json").is_file():
        shutil.copy(REAL_CACHE / "peak_flops.json", cache / "peak_flops.json")
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
