"""Property: whatever bytes a JSON, JSONL or CSV file holds, loading it either gives examples or
raises our DataError (one line, naming the file) — never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith import config as config_module
from tunesmith.data.gather import load
from tunesmith.errors import DataError

KEYS = ["question", "answer", "instruction", "input", "output", "prompt", "completion", "response",
        "messages", "conversations", "text", "role", "content", "from", "value", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=5)),
    max_leaves=12)
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot", 3, None])
chats = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": roles, "content": st.one_of(st.text(max_size=8), st.integers())}), max_size=4)})

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(name: str, content: bytes, fmt: str = "auto") -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        data = config_module.build({"data": {"path": str(path), "format": fmt}}).data
        try:
            loaded = load(str(path), data)
        except DataError as err:
            message = str(err)
            assert "\n" not in message, message
            assert str(path) in message, message
            return
        assert loaded.examples and all(e.messages[-1]["role"] == "assistant" for e in loaded.examples)


def mangle(text: str, cut: int, junk: str) -> str:
    """Valid text with a cut and some junk spliced in."""
    cut = cut % (len(text) + 1)
    return text[:cut] + junk + text[cut:]


@PROPERTY
@given(st.lists(st.one_of(rows, chats, json_values), max_size=5), st.integers(0, 400),
       st.text(max_size=4), st.booleans())
def test_jsonl_loads_or_raises_data_error(items, cut, junk, broken):
    text = "\n".join(json.dumps(item) for item in items)
    if broken:
        text = mangle(text, cut, junk)
    check("d.jsonl", text.encode("utf-8"))


@PROPERTY
@given(st.one_of(st.lists(st.one_of(rows, chats), max_size=5), json_values), st.integers(0, 400),
       st.text(max_size=4), st.booleans())
def test_json_loads_or_raises_data_error(document, cut, junk, broken):
    text = json.dumps(document, indent=1)
    if broken:
        text = mangle(text, cut, junk)
    check("d.json", text.encode("utf-8"))


cells = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8) | st.sampled_from(
    ['"', '""', ",", "\n", "\r\n", " ", "NA", "null", "1e5", '"quoted, with comma"', "\t"])


@PROPERTY
@given(st.lists(st.sampled_from(["question", "answer", "text", "prompt", "x", "", "question"]), max_size=4),
       st.lists(st.lists(cells, max_size=5), max_size=5), st.sampled_from(["auto", "qa", "text"]))
def test_csv_loads_or_raises_data_error(header, body, fmt):
    lines = [",".join(header)] + [",".join(row) for row in body]
    check("d.csv", "\n".join(lines).encode("utf-8"), fmt)


@PROPERTY
@given(st.binary(max_size=64), st.sampled_from(["d.csv", "d.jsonl", "d.json", "d.txt", "d.html", "d.sql"]))
def test_random_bytes_load_or_raise_data_error(content, name):
    check(name, content)
