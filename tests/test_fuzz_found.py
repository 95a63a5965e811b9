"""Defects bench/fuzz.py found, one test each: every bad input is a user error (exit code 2 and one
line `tunesmith: ... error: ...`, or an HTTP 4xx), never a traceback or a 5xx, and nothing is written."""

from __future__ import annotations

import http.client
import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO, qa_rows, write_jsonl

pytest.importorskip("fastapi", reason="serve is in the test extra: pip install -e '.[test]'")


def one_error_line(result) -> str:
    """The refusal's single line; it must be the last thing on stderr."""
    errors = [line for line in result.err.splitlines() if line.startswith("tunesmith:")]
    assert len(errors) == 1 and errors[0] == result.err.strip().splitlines()[-1], result.err
    assert "Traceback" not in result.err + result.out
    return errors[0]


# ---- the server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(llama):
    """`tunesmith serve` on the tiny llama, as a real process on a free loopback port."""
    command = [sys.executable, "-m", "tunesmith", "serve", "--model", str(llama), "--port", "0",
               "--max-tokens", "8", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=dict(os.environ))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and not any(line.startswith("Serving ") for line in seen):
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            assert process.poll() is None, "".join(seen)
    port = int(seen[-1].split(" on ")[1].split()[0].rsplit(":", 1)[1].split("/")[0])
    yield port, llama.name, seen
    process.terminate()
    process.wait(timeout=30)


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_serve_refuses_a_lone_surrogate_in_a_message(server):
    port, model, log = server
    body = {"model": model, "messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}
    status, answer = post(port, "/v1/chat/completions", body)  # json.dumps writes it as the escape \ud800
    assert status == 400, answer  # was 500: the tokenizer raised TypeError
    assert answer["error"]["param"] == "messages[0].content"
    assert "lone surrogate" in answer["error"]["message"]
    assert not any("Traceback" in line for line in log)


def test_serve_refuses_a_lone_surrogate_in_a_prompt(server):
    port, model, _ = server
    status, answer = post(port, "/v1/completions", {"model": model, "prompt": ["ok", "\udfff"], "max_tokens": 2})
    assert status == 400, answer
    assert answer["error"]["param"] == "prompt"


def test_serve_refuses_a_repetition_penalty_that_overflows_the_logits(server):
    port, model, _ = server
    body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 2, "repetition_penalty": 1e-45}
    status, answer = post(port, "/v1/completions", body)
    assert status == 400, answer  # was 500: logits / 1e-45 are inf, the probabilities NaN
    assert answer["error"]["message"].startswith("repetition_penalty=1e-45 must be a number of at least 0.01")


def test_a_tiny_temperature_decodes_greedily(server):
    port, model, _ = server
    answers = []
    for temperature in (1e-45, 0.0):
        body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 6, "temperature": temperature}
        status, answer = post(port, "/v1/completions", body)
        assert status == 200, answer  # was 500 for 1e-45, as repetition_penalty above
        answers.append(answer["choices"][0]["text"])
    assert answers[0] == answers[1]


def test_serve_port_out_of_range_is_a_user_error(cli, tmp_path):
    result = cli("serve", "--port", "99999999", "--model", tmp_path / "none")
    assert result.code == 2  # was OverflowError from socket.bind
    assert one_error_line(result) == ("tunesmith: error: --port 99999999 is not a port number "
                                      "(0-65535; 0 picks a free one)")


# ---- config and data -------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["{{prompt}}", "Q: {prompt} {input.x}"])
def test_a_custom_template_must_really_hold_the_prompt(cli, llama, tmp_path, template):
    """'{{prompt}}' is the literal text {prompt} (every example got the same prompt); '{input.x}' raised
    AttributeError."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    run_dir = tmp_path / "run"
    result = cli("prepare", "--model", llama, "--data.path", data, "--out_dir", run_dir,
                 "--data.template", template)
    assert result.code == 2
    assert one_error_line(result).startswith(f"tunesmith: config error: data.template={template!r}")
    assert not run_dir.exists()


@pytest.mark.parametrize("verb", ["prepare", "estimate"])
def test_a_model_that_is_not_there_offline_is_one_line(cli, tmp_path, verb, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    result = cli(verb, "--model", "nobody/nothing-here", "--data.path", data, "--out_dir", tmp_path / "run")
    assert result.code == 2  # the hub library's message runs over two lines, with a link
    assert "nobody/nothing-here" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_a_sqlite_query_cannot_attach_other_files(cli, llama, tmp_path):
    database = tmp_path / "faq.db"
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE faq (question TEXT, answer TEXT)")
    connection.executemany("INSERT INTO faq VALUES (?, ?)", [(r["question"], r["answer"]) for r in qa_rows(12)])
    connection.commit()
    connection.close()
    created = tmp_path / "created.db"
    result = cli("prepare", "--model", llama, "--data.path", database, "--out_dir", tmp_path / "run",
                 "--data.query", f"ATTACH DATABASE '{created}' AS other")
    assert result.code == 2
    assert one_error_line(result) == f"tunesmith: error: {database}: data.query failed: not authorized"
    assert not created.exists()  # mode=ro covered the database only: ATTACH created this file
    assert not (tmp_path / "run").exists()


def test_inspect_without_a_data_path_is_a_user_error(cli, llama, tmp_path):
    result = cli("inspect", "--model", llama, "--out_dir", tmp_path / "run")
    assert result.code == 2  # was TypeError from Path(None)
    assert one_error_line(result).startswith("tunesmith: error: data.path is not set")
    assert not (tmp_path / "run").exists()


def test_a_damaged_datasets_folder_is_a_user_error(cli, llama, tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text("[]")
    result = cli("prepare", "--model", llama, "--data.path", folder, "--out_dir", tmp_path / "run")
    assert result.code == 2  # was a KeyError or TypeError from datasets.load_from_disk
    assert one_error_line(result).startswith(f"tunesmith: error: {folder}: not a readable datasets folder")
    assert not (tmp_path / "run").exists()


def test_deeply_nested_html_is_a_user_error(cli, llama, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html><body>" + "<div>" * 3000 + "<p>deep</p>" + "</div>" * 3000 + "</body></html>")
    result = cli("prepare", "--model", llama, "--data.path", page, "--out_dir", tmp_path / "run")
    assert result.code == 2  # was RecursionError from the recursive text walk
    assert one_error_line(result).startswith(f"tunesmith: error: {page}: elements nested too deeply to read")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["1,2,3", "cuda:99"])
def test_a_device_that_is_not_there_is_a_user_error(cli, llama, tmp_path, device):
    """'1,2,3' raised torch's RuntimeError; a CUDA device on a machine without it raised AssertionError
    from deep in the model loading, after evaluate had prepared the data into the run folder."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    result = cli("evaluate", "--model", llama, "--data.path", data, "--out_dir", tmp_path / "run",
                 "--train.device", device)
    assert result.code == 2
    assert one_error_line(result).startswith(f"tunesmith: config error: device {device!r}")
    assert not (tmp_path / "run").exists()


def test_an_unknown_benchmark_task_is_refused_before_the_data_is_prepared(cli, llama, tmp_path):
    """evaluate --eval.tasks '"' prepared the test split into the run folder, then refused the task."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    result = cli("evaluate", "--model", llama, "--data.path", data, "--out_dir", tmp_path / "run",
                 "--eval.tasks", '"')
    assert result.code == 2
    assert one_error_line(result).startswith("tunesmith: config error: eval.tasks")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verb", ["finetune", "prepare"])
def test_a_device_that_is_not_there_stops_finetune_before_anything_is_written(cli, llama, tmp_path, verb):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    result = cli(verb, "--model", llama, "--data.path", data, "--out_dir", tmp_path / "run",
                 "--train.device", "cuda:99")
    if verb == "prepare":  # prepare runs no model: the device does not matter to it
        assert result.code == 0
        return
    assert result.code == 2
    assert one_error_line(result).startswith("tunesmith: config error: device 'cuda:99'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, message", [
    ("[" * 5000 + "]" * 5000, "d.jsonl: JSON nested too deeply to read"),  # read as one JSON array
    ('{"question": "a \\ud800 b", "answer": "x"}', "d.jsonl:1: text with an unpaired surrogate escape"),
])
def test_json_that_python_reads_but_text_cannot_hold_is_a_user_error(cli, llama, tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    result = cli("prepare", "--model", llama, "--data.path", path, "--out_dir", tmp_path / "run")
    assert result.code == 2
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("data.tmp*"))


@pytest.mark.parametrize("text, message", [
    ("model: x\x00\n", "bad.yaml: not valid YAML"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", "bad.yaml: YAML nested too deeply to read"),
])
def test_unreadable_yaml_is_one_line(cli, tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = cli("prepare", bad)
    assert result.code == 2 and message in one_error_line(result)


def test_a_batch_size_beyond_any_machine_is_a_config_error(cli, tmp_path):
    result = cli("estimate", "--train.batch_size", 10 ** 400)
    assert result.code == 2
    assert one_error_line(result).startswith("tunesmith: config error: train.batch_size=")
