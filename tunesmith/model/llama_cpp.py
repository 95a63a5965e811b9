"""llama.cpp's own tools, used from Python: its HF → GGUF converters and its quantizer.

The converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` package and the
matching `gguf-py`) are not installed by any wheel; they ship inside the source package of
llama-cpp-python, the same package whose compiled libllama loads the files. tunesmith takes them
from the source package of the *installed* llama-cpp-python version, once, so converter and
library always come from one llama.cpp commit:

    pip download --no-binary llama-cpp-python==<installed> → vendor/llama.cpp/{convert_*.py,
    conversion/, gguf-py/} → <venv>/share/tunesmith/llama.cpp-<version>/ (or the tunesmith cache)

`python -m tunesmith.model.llama_cpp` fetches them ahead of time (the Makefile does, at install).
The converters run in a subprocess: they put their own `gguf` first on the import path, which must
not replace the `gguf` tunesmith itself imports.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.log import say

PACKAGE = "llama-cpp-python"
WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
ENTRY = Path(__file__).with_name("llama_cpp_entry.py")
# what llama.cpp's quantizer makes, by the names `--type` takes (llama_ftype values of llama.h)
QUANTIZER_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")


class LlamaCppError(TunesmithError):
    """llama.cpp's tools are missing or refused the model."""


def installed_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise LlamaCppError("GGUF export needs llama.cpp: pip install 'tunesmith[gguf]' "
                            "(it compiles llama.cpp's library, a few minutes once)") from None


def _candidates(version: str) -> list[Path]:
    from tunesmith.model.load import cache_root

    return [Path(sys.prefix) / "share" / "tunesmith" / f"llama.cpp-{version}",
            cache_root() / f"llama.cpp-{version}"]


def converter_root() -> Path:
    """The folder holding llama.cpp's converters for the installed llama-cpp-python, fetched once."""
    version = installed_version()
    for folder in _candidates(version):
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    for folder in _candidates(version):
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder.parent, os.W_OK):
            return _fetch(version, folder)
    raise LlamaCppError("no writable folder for llama.cpp's converter: set TUNESMITH_CACHE")


def _fetch(version: str, folder: Path) -> Path:
    say(f"Fetching llama.cpp's converter from the {PACKAGE} {version} source package (once)")
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={version}", "-d", download]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = list(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no source package"])[-1]
            raise LlamaCppError(f"could not fetch the {PACKAGE} {version} source package ({last})")
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _extract(archives[0], tmp)
    os.replace(tmp, folder)
    return folder


def _extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            _, _, inside = member.name.partition("/vendor/llama.cpp/")
            if inside and inside.startswith(WANTED) and (member.isfile() or member.isdir()):
                member.name = inside
                tar.extract(member, into, filter="data")


def supported_architectures(root: Path) -> set[str]:
    """The HF `architectures` names the converter knows (its TEXT_MODEL_MAP), read without importing it."""
    tree = ast.parse((root / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise LlamaCppError(f"{root}: llama.cpp's converter has no TEXT_MODEL_MAP; tunesmith does not know this version")


def run_converter(script: str, args: list[str], pre_tokenizer: str, what: str) -> None:
    """Run one of llama.cpp's converters; a failure is one line with the converter's own last words."""
    root = converter_root()
    env = dict(os.environ, TUNESMITH_GGUF_PRE=pre_tokenizer, HF_HUB_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not tunesmith's gguf package
    command = [sys.executable, str(ENTRY), str(root), script, *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise LlamaCppError(f"llama.cpp's converter could not convert {what}: "
                            f"{lines[-1] if lines else 'exit code ' + str(done.returncode)}")


def quantize(source: Path, target: Path, kind: str) -> None:
    """llama.cpp's quantizer (k-quants need its importance-free mixes, which only it makes)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZER_TYPES[kind]
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        raise LlamaCppError(f"llama.cpp's quantizer could not make {kind} from {source.name} (code {code})")


if __name__ == "__main__":  # fetch the converter ahead of time (make install does)
    print(converter_root())
