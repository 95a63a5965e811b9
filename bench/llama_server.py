"""llama.cpp's own HTTP server, the peer for bench/serve_load.py: built once from the source package
of the llama-cpp-python version tunesmith uses (PyPI has no llama-server binary that runs on this
glibc), with the compiler here, and cached. A benchmark peer, never a dependency of tunesmith.

    .venv/bin/python bench/llama_server.py            # builds if needed; prints the binary's path

The build is for this CPU (-march=native) without AMX (these virtual machines report AMX but stop
its first instruction), in ~/.cache/tunesmith-bench/llama.cpp-<version>/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def build_dir() -> Path:
    version = metadata.version("llama-cpp-python")
    return Path.home() / ".cache" / "tunesmith-bench" / f"llama.cpp-{version}"


def source(version: str, into: Path) -> Path:
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", download], check=True)
        archive = next(Path(download).glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    return next(into.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"


def build() -> Path:
    folder = build_dir()
    binary = folder / "bin" / "llama-server"
    if binary.is_file():
        return binary
    version = metadata.version("llama-cpp-python")
    with tempfile.TemporaryDirectory() as work:
        tree = source(version, Path(work))
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}",
                 f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
        subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), *flags], check=True)
        subprocess.run(["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j",
                        str(os.cpu_count() or 2)], check=True)
        (folder / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / "build" / "bin" / "llama-server", binary)
    return binary


if __name__ == "__main__":
    print(build())
