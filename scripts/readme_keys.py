"""Rewrite the config-key table of README.md from tunesmith.config.field_docs() (the source of
`tunesmith VERB --help`), so the README never drifts from the code. tests/test_config.py checks it.

    .venv/bin/python scripts/readme_keys.py
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = "| key | default | meaning |"


def table() -> list[str]:
    from tunesmith.config import field_docs

    rows = [HEADER, "|---|---|---|"]
    for key, default, doc in field_docs():
        shown = f"`{default}`"
        if len(default) > 60 and default.startswith("["):  # a long list: its size, and where to read it
            shown = f"{default.count(', ') + 1} entries (`tunesmith finetune --help` lists them)"
        rows.append(f"| `{key}` | {shown} | {doc.replace('|', chr(92) + '|')} |")
    return rows


def split(text: str) -> tuple[list[str], list[str], list[str]]:
    """(lines before the table, the table's lines, lines after it)."""
    lines = text.splitlines()
    start = lines.index(HEADER, lines.index("### Config keys"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[:start], lines[start:end], lines[end:]


def main() -> int:
    before, _, after = split(README.read_text())
    README.write_text("\n".join(before + table() + after) + "\n")
    print(f"Wrote the config-key table of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
