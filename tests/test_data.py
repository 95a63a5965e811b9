"""Data: every row shape becomes the same conversation; errors name the file and line and exit 2
without leaving anything half-written; splits are seeded; prepared data is reused or rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import qa_rows, write_json, write_jsonl

from tunesmith import config as config_module
from tunesmith.data import prepare as prepare_module
from tunesmith.data.formats import detect_format, load_examples, read_rows
from tunesmith.errors import DataError


def user_assistant(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


SHAPES = [  # (row, detected format, expected messages, instruction, input)
    ({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca",
     user_assistant("Translate\n\nchat", "cat"), "Translate", "chat"),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca",
     user_assistant("Say hi", "hi"), "Say hi", ""),
    ({"instruction": "Say hi", "output": "hi"}, "alpaca", user_assistant("Say hi", "hi"), "Say hi", ""),
    ({"question": "Capital of France?", "answer": "Paris"}, "qa",
     user_assistant("Capital of France?", "Paris"), "Capital of France?", ""),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", user_assistant("2+2=", "4"), "2+2=", ""),
    ({"instruction": "Greet", "response": "hello"}, "prompt_completion",
     user_assistant("Greet", "hello"), "Greet", ""),
    ({"input": "ping", "output": "pong"}, "prompt_completion", user_assistant("ping", "pong"), "ping", ""),
    ({"question": "How many?", "answer": 3}, "qa", user_assistant("How many?", "3"), "How many?", ""),
]


@pytest.mark.parametrize("row, fmt, messages, instruction, extra_input", SHAPES,
                         ids=[f"{s[1]}-{'-'.join(s[0])}" for s in SHAPES])
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_single_turn_shapes(tmp_path, row, fmt, messages, instruction, extra_input, container):
    path = tmp_path / f"data.{container}"
    other = dict(row)
    (write_jsonl if container == "jsonl" else write_json)(path, [row, other])
    examples, detected = load_examples(path, "auto")
    assert detected == fmt
    assert len(examples) == 2
    example = examples[0]
    assert example.messages == messages
    assert example.prompt_messages == messages[:-1]
    assert example.reference == messages[-1]["content"]
    assert (example.instruction, example.input) == (instruction, extra_input)
    assert example.where == (f"{path}:1" if container == "jsonl" else f"{path}:item 1")


def test_extra_fields_are_kept_for_analysis(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "topic": "geo", "id": 7}])
    [example], _ = load_examples(path, "auto")
    assert example.extra == {"topic": "geo", "id": 7}


def test_multi_turn_chat_messages(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation, "id": 1}])
    [example], fmt = load_examples(path, "auto")
    assert fmt == "messages"
    assert example.messages == conversation
    assert example.prompt_messages == conversation[:-1]
    assert example.reference == "Paris"
    assert example.instruction == "Capital of France?"  # the last user turn


def test_json_array_and_single_object(tmp_path):
    path = write_json(tmp_path / "one.json", {"question": "q", "answer": "a"})
    [example], fmt = load_examples(path, "auto")
    assert fmt == "qa" and example.reference == "a"
    # a JSON array in a file without the .json suffix is still read as an array
    path = tmp_path / "array.txt"
    path.write_text(json.dumps(qa_rows(3)))
    assert [where for _, where in read_rows(path)] == [f"{path}:item {i}" for i in (1, 2, 3)]


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": "d"}\n')
    assert [where for _, where in read_rows(path)] == [f"{path}:1", f"{path}:3"]


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "input": "x", "output": "o"}])
    [example], fmt = load_examples(path, "prompt_completion")
    assert fmt == "prompt_completion"
    assert example.messages == user_assistant("x", "o")  # input/output is a prompt_completion shape


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n\n{"question": "e" "answer"}\n',
     r"d\.jsonl:4: not valid JSON"),
    ('{"foo": 1, "bar": 2}\n', r"d\.jsonl:1: cannot tell the data format from the keys \['bar', 'foo'\]"),
    ('{"question": "a", "answer": "b"}\n{"question": "c"}\n',
     r"d\.jsonl:2: missing fields for format qa \(needs question/answer; has \['question'\]\)"),
    ('{"question": "a", "answer": ""}\n', r"d\.jsonl:1: field 'answer' is empty"),
    ('{"question": "a", "answer": ["x"]}\n', r"d\.jsonl:1: field 'answer' must be text, got list"),
    ('{"question": "a", "answer": "b"}\n"text"\n', r"d\.jsonl:2: expected a JSON object, got str"),
    ('[{"question": "a", "answer": "b"}, 2]\n', r"d\.jsonl: item 2 is a int, expected an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n',
     r"d\.jsonl:1: the last message must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n',
     r"d\.jsonl:1: message 1 has unknown role 'robot'"),
    ('{"messages": []}\n', r"d\.jsonl:1: 'messages' must be a non-empty list"),
    ('', r"d\.jsonl: the file has no rows"),
    ('\n\n', r"d\.jsonl: the file has no rows"),
])
def test_row_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path, "auto")


def test_json_array_errors_name_the_line_or_item(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "c" "answer": "d"}\n]\n')
    with pytest.raises(DataError, match=r"d\.json:3: not valid JSON"):
        load_examples(path, "auto")
    write_json(path, [{"question": "a", "answer": "b"}, {"question": "c"}])
    with pytest.raises(DataError, match=r"d\.json:item 2: missing fields for format qa"):
        load_examples(path, "auto")
    write_json(path, [])
    with pytest.raises(DataError, match="has no rows"):
        load_examples(path, "auto")


def test_detect_format_prefers_messages():
    rows = [({"messages": [], "question": "q", "answer": "a"}, "x:1")]
    assert detect_format(rows, "x") == "messages"


# ---------------------------------------------------------------- errors through the CLI


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str, list[str]]]:
    """name → (data file, expected message fragment, extra flags)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    malformed = folder / "malformed.jsonl"
    malformed.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"\n')
    long_prompt = write_jsonl(folder / "long.jsonl", [{"question": "word " * 60, "answer": "yes"}] * 4)
    return {
        "missing": (folder / "nope.jsonl", f"data.path: data file {folder / 'nope.jsonl'} not found", []),
        "malformed": (malformed, f"{malformed}:2: not valid JSON", []),
        "unknown-format": (write_jsonl(folder / "f.jsonl", [{"a": 1, "b": 2}]),
                           "cannot tell the data format from the keys ['a', 'b']", []),
        "missing-field": (write_jsonl(folder / "m.jsonl", [{"prompt": "p", "completion": "c"},
                                                           {"prompt": "p"}]),
                          f"{folder / 'm.jsonl'}:2: missing fields for format prompt_completion", []),
        "empty": (write_jsonl(folder / "empty.jsonl", []), "the file has no rows", []),
        "too-short": (long_prompt, "data.max_seq_length=16 is too small", ["--data.max_seq_length", "16"]),
        "multi-turn-plain-template": (
            write_jsonl(folder / "multi.jsonl", [{"messages": [
                {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}] * 3),
            "a multi-turn conversation needs data.template: chat", ["--data.template", "alpaca"]),
    }


CASES = ["missing", "malformed", "unknown-format", "missing-field", "empty", "too-short",
         "multi-turn-plain-template"]


@pytest.mark.parametrize("verb", ["prepare", "finetune"])
@pytest.mark.parametrize("case", CASES)
def test_data_errors_exit_2_and_leave_nothing(cli, llama, tmp_path, case, verb):
    path, message, flags = bad_files(tmp_path)[case]
    run_dir = tmp_path / "run"
    result = cli(verb, "--model", llama, "--data.path", path, "--out_dir", run_dir, *flags)
    assert result.code == 2
    assert message in result.err
    assert result.err.strip().splitlines()[-1].startswith("tunesmith: error: ")
    assert "Traceback" not in result.err
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_a_failed_prepare_keeps_the_previous_data(cli, llama, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    run_dir = tmp_path / "run"
    assert cli("prepare", "--model", llama, "--data.path", path, "--out_dir", run_dir).code == 0
    manifest = (run_dir / "data" / "manifest.json").read_text()
    path.write_text(path.read_text() + "{broken\n")
    result = cli("prepare", "--model", llama, "--data.path", path, "--out_dir", run_dir)
    assert result.code == 2 and f"{path}:11: not valid JSON" in result.err
    assert (run_dir / "data" / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in run_dir.iterdir()) == ["data"]  # no temporary folder left


def test_processes_preparing_the_same_run_take_turns(tokenizer, tmp_path):
    """The ranks of one run prepare at once: while one holds the run's data, another waits (here a
    thread: flock locks separate opens in one process too), then reuses what was built."""
    import threading

    from tunesmith.locks import exclusive

    config = make_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", qa_rows(10)))
    prepare_module.prepare(config, tokenizer)
    done = []
    with exclusive(config.run_dir / "data"):
        other = threading.Thread(target=lambda: done.append(prepare_module.prepare(config, tokenizer)))
        other.start()
        other.join(timeout=3)  # the reuse path takes milliseconds: still running means it waits
        assert other.is_alive() and not done
    other.join(timeout=60)
    assert len(done) == 1 and done[0].manifest["examples"] == 10


def test_unknown_format_value_is_a_config_error(cli, llama, tmp_path):
    result = cli("prepare", "--model", llama, "--data.path", tmp_path / "x.jsonl", "--data.format", "csvish")
    assert result.code == 2
    assert "tunesmith: config error: data.format='csvish' is not one of" in result.err


# ---------------------------------------------------------------- splits, manifest, truncation


def make_config(tmp_path: Path, path: Path, **data) -> config_module.RunConfig:
    return config_module.build({"out_dir": str(tmp_path / "run"), "data": {"path": str(path), **data}})


def split_ids(config) -> dict[str, list[str]]:
    examples, _ = prepare_module.split_examples(config)
    return {name: [e.where for e in examples[name]] for name in examples}


def test_split_sizes_and_disjointness(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(50))
    ids = split_ids(make_config(tmp_path, path, val_split=0.2, test_split=0.1))
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (35, 10, 5)
    everything = ids["train"] + ids["val"] + ids["test"]
    assert sorted(everything) == sorted(f"{path}:{i}" for i in range(1, 51))


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(50))
    first = split_ids(make_config(tmp_path, path, seed=1))
    assert split_ids(make_config(tmp_path, path, seed=1)) == first
    other = split_ids(make_config(tmp_path, path, seed=2))
    assert other["test"] != first["test"] and other["val"] != first["val"]
    everything = sorted(where for ids in first.values() for where in ids)
    assert sorted(where for ids in other.values() for where in ids) == everything


def test_small_datasets_still_get_val_and_test_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    ids = split_ids(make_config(tmp_path, path))
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (2, 1, 1)
    ids = split_ids(make_config(tmp_path, path, val_split=0.0, test_split=0.0))
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (4, 0, 0)


def test_explicit_val_and_test_files_are_used(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(20))
    val = write_jsonl(tmp_path / "val.jsonl", qa_rows(3, start=100))
    test = write_json(tmp_path / "test.json", qa_rows(2, start=200))
    ids = split_ids(make_config(tmp_path, path, val_path=str(val), test_path=str(test)))
    assert ids["val"] == [f"{val}:{i}" for i in (1, 2, 3)]
    assert ids["test"] == [f"{test}:item {i}" for i in (1, 2)]
    assert ids["train"] == [f"{path}:{i}" for i in range(1, 21)]  # nothing held out of the main file
    # with only a val file, the test share still comes out of the main file
    ids = split_ids(make_config(tmp_path, path, val_path=str(val)))
    assert len(ids["test"]) == 2 and len(ids["train"]) == 18 and ids["val"][0] == f"{val}:1"


def test_prepared_data_is_reused_then_rebuilt(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(20))
    config = make_config(tmp_path, path)
    first = prepare_module.prepare(config, tokenizer)
    manifest_path = first.folder / "manifest.json"
    assert first.manifest["examples"] == 20 and first.manifest["format"]["train"] == "qa"
    written = manifest_path.stat().st_mtime_ns
    capsys.readouterr()

    again = prepare_module.prepare(config, tokenizer)
    assert "Reusing prepared data" in capsys.readouterr().err
    assert manifest_path.stat().st_mtime_ns == written
    assert again.manifest == first.manifest
    for name in ("train", "val", "test"):
        assert again.splits[name].input_ids.tolist() == first.splits[name].input_ids.tolist()
        assert again.rows(name) == first.rows(name)

    write_jsonl(path, qa_rows(25))  # the data changed: rebuilt
    rebuilt = prepare_module.prepare(config, tokenizer)
    assert "Reusing" not in capsys.readouterr().err
    assert rebuilt.manifest["examples"] == 25
    assert json.loads(manifest_path.read_text())["examples"] == 25

    unmasked = make_config(tmp_path, path, mask_prompt=False)  # a setting changed: rebuilt
    counts = prepare_module.prepare(unmasked, tokenizer).manifest["counts"]["train"]
    assert counts["supervised_tokens"] == counts["tokens"]
    assert "Reusing" not in capsys.readouterr().err


def test_prepared_split_layout(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    prepared = prepare_module.prepare(make_config(tmp_path, path), tokenizer)
    for name in ("train", "val", "test"):
        split, rows = prepared.splits[name], prepared.rows(name)
        assert len(split) == len(rows) == prepared.manifest["counts"][name]["examples"]
        tokens = prepared.manifest["counts"][name]["tokens"]
        assert int(split.offsets[-1]) == split.input_ids.shape[0] == tokens
        assert int(split.supervised.sum()) == prepared.manifest["counts"][name]["supervised_tokens"]
    row = prepared.rows("test")[0]
    assert row["prompt"].endswith("<|im_start|>assistant\n")  # the text generate() is given
    assert row["reference"] == str(int(row["messages"][-1]["content"].split()[2]) + 1)


def test_truncation_is_counted_and_empty_responses_dropped(tmp_path, tokenizer):
    rows = qa_rows(3) + [
        {"question": "Say many words", "answer": "word " * 40},  # response cut short, kept
        {"question": "word " * 40, "answer": "yes"},  # prompt fills the window: dropped
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = make_config(tmp_path, path, max_seq_length=24, val_split=0.0, test_split=0.0)
    prepared = prepare_module.prepare(config, tokenizer)
    counts = prepared.manifest["counts"]["train"]
    assert counts["rows"] == 5
    assert counts["truncated"] == 2  # both long rows were longer than 24 tokens
    assert counts["dropped_no_response"] == 1
    assert counts["examples"] == 4
    split = prepared.splits["train"]
    lengths = sorted(split.lengths.tolist())
    assert lengths[-1] == 24 and lengths[-2] < 24  # the long answer kept at the limit, the rest shorter
    long_index = [r["reference"].strip() for r in prepared.rows("train")].index(("word " * 40).strip())
    ids, supervised = split.example(long_index)
    assert len(ids) == 24 and supervised[-1]  # cut at the limit, still trained on what is left
    lines = prepare_module.summary_lines(prepared)
    assert "2 truncated at 24 tokens" in lines[0] and "1 dropped (response truncated away)" in lines[0]
