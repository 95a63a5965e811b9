"""bench/RESULTS.md is shared by every bench: each owns one section between its own markers."""

from __future__ import annotations

import os
from pathlib import Path


def write_section(path: Path, name: str, section: list[str]) -> None:
    """Replace the section between <!-- name:begin --> and <!-- name:end -->, keeping every other one
    (appended at the end the first time); written through a temporary file."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = "\n".join([begin, *section, end])
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + body + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)
