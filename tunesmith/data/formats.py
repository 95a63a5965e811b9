"""Read rows from JSON / JSONL files and turn each into a conversation.

Every shape becomes the same thing, an `Example`: a list of chat messages whose assistant turns
are the responses, plus the single-turn parts (instruction, input) that plain templates need.
Errors name the file and line, so a user can open the file at the bad row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import DataError

# Keys that identify a shape: (format, prompt key, optional input key, response key).
SHAPES = [
    ("alpaca", "instruction", "input", "output"),
    ("qa", "question", None, "answer"),
    ("prompt_completion", "prompt", None, "completion"),
    ("prompt_completion", "instruction", None, "response"),
    ("prompt_completion", "input", None, "output"),
]
FORMATS = ("alpaca", "qa", "prompt_completion", "messages", "sharegpt", "text", "preference", "hh", "kto")
PAIR_FORMATS = ("preference", "hh")  # a prompt with a chosen and a rejected answer
PREFERENCE_FORMATS = PAIR_FORMATS + ("kto",)  # kto: one answer labelled desirable or not
ROLES = {"system", "user", "assistant"}
# ShareGPT speakers ("from") and the chat role each one is.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}


@dataclass
class Example:
    messages: list[dict]  # [{"role", "content"}...], ends with an assistant turn
    instruction: str = ""  # single-turn parts, for the alpaca / qa / custom templates
    input: str = ""
    where: str = ""  # "file:line", for error messages and per-row results
    extra: dict = field(default_factory=dict)  # other fields of the row, kept for analysis
    rejected: str | None = None  # preference pairs: the worse answer (the last message is the chosen one)
    label: bool | None = None  # kto: is the answer (the last message) desirable

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


def read_rows(path: str | Path) -> list[tuple[dict, str]]:
    """Rows of a JSON array or JSONL file, each with 'file:line' for messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if path.suffix == ".json" or text.lstrip().startswith("["):
        return _read_json_array(path, text)
    return _read_jsonl(path, text)


def _read_jsonl(path: Path, text: str) -> list[tuple[dict, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: JSON nested too deeply to read") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        _check_text(row, f"{path}:{number}")
        rows.append((row, f"{path}:{number}"))
    return rows


def _check_text(row: dict, where: str) -> None:
    """A JSON escape such as \\ud800 decodes to half a character that no tokenizer or file can hold."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: text with an unpaired surrogate escape ({err.object[err.start:err.end]!a}); "
                        "the character is not valid Unicode") from None


def _read_json_array(path: Path, text: str) -> list[tuple[dict, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of JSON objects")
    rows = []
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index + 1} is a {type(row).__name__}, expected an object")
        _check_text(row, f"{path}:item {index + 1}")
        rows.append((row, f"{path}:item {index + 1}"))
    return rows


def detect_format(rows: list[tuple[dict, str]], source: str) -> str:
    """The shape whose keys the first rows have; a DataError listing the keys otherwise."""
    if not rows:
        raise DataError(f"{source}: no rows")
    keys = set(rows[0][0])
    if "chosen" in keys and "rejected" in keys:
        return "preference" if "prompt" in keys else "hh"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    for name, prompt_key, _, response_key in SHAPES:
        if prompt_key in keys and response_key in keys:
            return name
    if "text" in keys:
        return "text"
    raise DataError(f"{rows[0][1]}: cannot tell the data format from the keys {sorted(keys)}; expected "
                    "instruction/input/output, question/answer, prompt/completion, "
                    "instruction/response, input/output, messages, conversations (ShareGPT) or text; "
                    "for preference tuning prompt/chosen/rejected, chosen/rejected or prompt/completion/label "
                    "(or set data.format, or map your columns with data.columns)")


def to_example(row: dict, where: str, fmt: str) -> Example:
    if fmt in PREFERENCE_FORMATS:
        from tunesmith.data.pairs import to_preference_example

        return to_preference_example(row, where, fmt)
    if fmt == "messages":
        return _from_messages(row, where)
    if fmt == "sharegpt":
        return _from_sharegpt(row, where)
    if fmt == "text":
        return _from_text(row, where)
    for name, prompt_key, input_key, response_key in SHAPES:
        if name == fmt and prompt_key in row and response_key in row:
            return _single_turn(row, where, prompt_key, input_key, response_key)
    expected = " or ".join(f"{p}/{r}" for n, p, _, r in SHAPES if n == fmt)
    raise DataError(f"{where}: missing fields for format {fmt} (needs {expected}; has {sorted(row)})")


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: field {key!r} is missing or null")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    return value


def _single_turn(row, where, prompt_key, input_key, response_key) -> Example:
    instruction = _text(row, prompt_key, where)
    extra_input = _text(row, input_key, where, required=False) if input_key else ""
    response = _text(row, response_key, where)
    if not instruction.strip():
        raise DataError(f"{where}: field {prompt_key!r} is empty")
    if not response.strip():
        raise DataError(f"{where}: field {response_key!r} is empty")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    used = {prompt_key, input_key, response_key}
    extra = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return Example(messages, instruction, extra_input, where, extra)


def _from_messages(row: dict, where: str) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for turn_number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {turn_number} needs 'role' and 'content'")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: message {turn_number} has unknown role {role!r} "
                            f"(expected one of {sorted(ROLES)})")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {turn_number} content must be text")
        clean.append({"role": role, "content": message["content"]})
    if clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")
    if not clean[-1]["content"].strip():
        raise DataError(f"{where}: the last assistant message is empty")
    users = [m["content"] for m in clean if m["role"] == "user"]
    instruction = users[-1] if users else ""
    return Example(clean, instruction, "", where)


def _from_sharegpt(row: dict, where: str) -> Example:
    """ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for turn_number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {turn_number} needs 'from' and 'value'")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{where}: turn {turn_number} has unknown role {speaker!r} in 'from' "
                            f"(expected one of {sorted(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    return _from_messages({"messages": messages}, where)


def _from_text(row: dict, where: str) -> Example:
    """A document for continued pre-training: one assistant 'turn' holding the whole text, so
    cleaning and deduplication treat it like any response. Templates never render it."""
    text = _text(row, "text", where)
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty")
    extra = {k: v for k, v in row.items() if k != "text" and isinstance(v, (str, int, float, bool))}
    return Example([{"role": "assistant", "content": text}], "", "", where, extra)


def load_examples(path: str | Path, fmt: str) -> tuple[list[Example], str]:
    """All examples of one file and the format used (detected when fmt is auto)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    chosen = detect_format(rows, str(path)) if fmt == "auto" else fmt
    return [to_example(row, where, chosen) for row, where in rows], chosen
