"""tunesmith studio's API: runs read from disk as they are (statuses, damaged metrics, deleted runs),
the New-run form's checks, runs started, stopped and resumed as real CLI processes, answers
streamed from the base and tuned models, comparison of runs, and the key off loopback.
The page itself is driven in a real browser in test_studio_browser.py."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import fast_train_flags, qa_rows, write_jsonl

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from tunesmith import locks
from tunesmith.studio.app import create_app


@pytest.fixture
def studio(tmp_path):
    root = tmp_path / "runs"
    return root, TestClient(create_app(root))


def wait_for(client, name: str, statuses: set[str], timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.get(f"/api/runs/{name}").json()
        if run.get("status") in statuses:
            return run
        time.sleep(0.5)
    raise AssertionError(f"{name} never reached {statuses}: {run}")


def fake_run(root: Path, name: str, config: dict, metrics: list, folders: tuple[str, ...] = ()) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("\n".join(m if isinstance(m, str) else json.dumps(m) for m in metrics) + "\n")
    for sub in folders:
        (folder / sub).mkdir()
    os.utime(folder / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))  # not written lately
    return folder


CURVE = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "tokens_per_second": 100.0} for s in range(1, 9)]


def test_runs_show_status_read_from_disk(studio):
    root, client = studio
    fake_run(root, "done", {"method": "lora", "data": {"path": "a.jsonl"}, "train": {"max_steps": 8}},
             [*CURVE, {"step": 8, "val_loss": 0.5}], ("final",))
    fake_run(root, "stopped-midway", {"method": "dora"}, CURVE[:4], ("step-000004",))
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["done"]["status"] == "finished"
    assert runs["done"]["step"] == 8 and runs["done"]["max_steps"] == 8 and runs["done"]["best_val_loss"] == 0.5
    assert runs["done"]["data"] == "a.jsonl"
    assert runs["stopped-midway"]["status"] == "interrupted" and runs["stopped-midway"]["resumable"]
    assert runs["stopped-midway"]["method"] == "dora"
    detail = client.get("/api/runs/done").json()
    assert [p[0] for p in detail["curves"]["loss"]] == list(range(1, 9))
    assert detail["curves"]["val_loss"] == [[8, 0.5]]
    assert detail["diagnosis"]["headline"]
    assert detail["commands"]["evaluate"] == f"tunesmith evaluate {root.resolve() / 'done'}"


def test_a_training_process_shows_as_running_and_is_the_one_stop_signals(studio):
    root, client = studio
    folder = fake_run(root, "live", {}, CURVE[:2], ("step-000002",))
    with locks.training(folder):
        assert locks.training_pid(folder) == os.getpid()
        assert client.get("/api/runs/live").json()["status"] == "running"
    assert locks.training_pid(folder) is None
    assert client.get("/api/runs/live").json()["status"] == "interrupted"
    assert client.post("/api/runs/live/stop").status_code == 409  # nothing trains it any more


def test_a_diverged_run_still_answers_in_json(studio):
    root, client = studio
    folder = fake_run(root, "diverged", {}, [*CURVE[:3], {"step": 4, "loss": float("nan")},
                                             {"step": 4, "val_loss": float("inf")}], ("final",))
    (folder / "eval").mkdir()
    (folder / "eval" / "results.json").write_text('{"base": {"test_loss": 2.0}, "tuned": {"test_loss": NaN}}')
    detail = client.get("/api/runs/diverged").json()
    assert detail["results"]["tuned"]["test_loss"] is None and detail["best_val_loss"] is None
    assert [p[0] for p in detail["curves"]["loss"]] == [1, 2, 3]


def test_damaged_metrics_line_is_named_and_skipped(studio):
    root, client = studio
    lines = [json.dumps(CURVE[0]), "{not json", json.dumps(CURVE[1]), '{"step": 3, "lo']  # last: half-written
    fake_run(root, "damaged", {}, lines, ("final",))
    detail = client.get("/api/runs/damaged").json()
    assert detail["problems"] == ["metrics.jsonl line 2 is not a JSON record; skipped"]
    assert [p[0] for p in detail["curves"]["loss"]] == [1, 2]


def test_unknown_or_deleted_run_is_a_404_with_a_reason(studio):
    root, client = studio
    response = client.get("/api/runs/nope")
    assert response.status_code == 404 and "no run 'nope'" in response.json()["problems"][0]
    assert client.get("/api/runs/..%2F..%2Fetc").status_code == 404
    folder = fake_run(root, "gone", {}, CURVE, ("final",))
    assert client.get("/api/runs/gone").status_code == 200
    import shutil

    shutil.rmtree(folder)
    assert client.get("/api/runs/gone").status_code == 404
    assert client.post("/api/runs/gone/evaluate").status_code == 404
    assert client.get("/api/runs").json()["runs"] == []


def test_form_lists_every_key_and_checks_values_like_the_cli(studio, llama, tmp_path):
    root, client = studio
    fields = {f["key"]: f for f in client.get("/api/fields").json()["fields"]}
    assert fields["method"]["choices"][:2] == ["lora", "full"] and fields["method"]["basic"]
    assert fields["train.learning_rate"]["doc"] and "out_dir" not in fields
    bad = client.post("/api/check", json={"name": "x", "values": {"train.learning_rate": "fast",
                                                                  "lora.r": "0", "nonsense.key": "1"}}).json()
    assert any(p.startswith("train.learning_rate") for p in bad["problems"])
    assert any(p.startswith("lora.r") for p in bad["problems"])
    assert any("nonsense.key" in p for p in bad["problems"])
    fake_run(root, "taken", {}, CURVE, ("final",))
    assert "already exists" in client.post("/api/check", json={"name": "taken", "values": {}}).json()["problems"][0]
    assert "run name" in client.post("/api/check", json={"name": "../up", "values": {}}).json()["problems"][0]
    response = client.post("/api/runs", json={"name": "y", "values": {"train.epochs": "-1"}})
    assert response.status_code == 422 and not (root / "y").exists()


def test_check_runs_the_doctor_and_the_estimate(studio, llama, monkeypatch):
    root, client = studio
    write_jsonl(root / "qa.jsonl", qa_rows(40))
    monkeypatch.chdir(root)  # a relative path is read from where the studio was started
    client = TestClient(create_app(root / "elsewhere"))
    result = client.post("/api/check", json={"name": "ok", "values": {"model": str(llama), "data.path": "qa.jsonl"}}).json()
    assert result["problems"] == []
    assert result["doctor"]["rows"]["train"] + result["doctor"]["rows"]["val"] + result["doctor"]["rows"]["test"] == 40
    assert result["doctor"]["verdict"].startswith("ready to train")
    assert client.get(f"/api/doctor/{result['doctor']['plot']}").content[:4] == b"\x89PNG"
    assert result["memory"]["fits"] is True and result["memory"]["largest_micro_batch"] > 0
    assert f"--data.path={(root / 'qa.jsonl').resolve()}" in result["command"]
    missing = client.post("/api/check", json={"name": "ok", "values": {"model": str(llama), "data.path": "nope.jsonl"}})
    assert missing.json()["doctor"]["verdict"] == "cannot read the data"
    assert not (root / "elsewhere" / "ok").exists()  # checking writes no run


def test_start_stop_resume_as_real_processes(studio, llama):
    root, client = studio
    write_jsonl(root / "qa.jsonl", qa_rows(40))
    values = {"model": str(llama), "data.path": str(root / "qa.jsonl"), "train.max_steps": "400", "train.save_interval": "0",
              **{k.lstrip("-"): str(v) for k, v in zip(fast_train_flags()[::2], fast_train_flags()[1::2])
                 if k != "--train.max_steps"}}
    started = client.post("/api/runs", json={"name": "long", "values": values})
    assert started.status_code == 200 and started.json()["command"].startswith("tunesmith finetune --out_dir=")
    run = wait_for(client, "long", {"running"})
    while not run["curves"].get("loss"):
        run = client.get("/api/runs/long").json()
        time.sleep(0.3)
    assert client.post("/api/runs/long/evaluate").status_code == 409  # busy training
    assert client.post("/api/runs/long/stop").status_code == 200
    stopped = wait_for(client, "long", {"interrupted"})
    assert stopped["resumable"] and "Resume with" in stopped["log"]
    resumed = client.post("/api/runs/long/resume").json()
    assert resumed["command"] == f"tunesmith finetune {(root / 'long').resolve()} --resume"
    wait_for(client, "long", {"running"})
    client.post("/api/runs/long/stop")
    wait_for(client, "long", {"interrupted"})


def test_a_failed_run_shows_the_cli_error(studio, llama):
    root, client = studio
    (root / "broken.jsonl").write_text('{"question": "a", "answer": "b"}\nnot json\n')
    client.post("/api/runs", json={"name": "broken", "values": {"model": str(llama),
                                                                "data.path": str(root / "broken.jsonl")}})
    run = wait_for(client, "broken", {"failed"}, timeout=120)
    assert run["error"].endswith("broken.jsonl:2: not valid JSON (Expecting value at column 1)")
    assert [r["status"] for r in client.get("/api/runs").json()["runs"]] == ["failed"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama):
    from tunesmith.cli import main

    root = tmp_path_factory.mktemp("studio-runs")
    data = write_jsonl(root / "qa.jsonl", qa_rows(30))
    code = main(["finetune", "--model", str(llama), "--data.path", str(data), "--out_dir", str(root / "tuned"),
                 *map(str, fast_train_flags(max_steps=20)), "--train.learning_rate", "0.03"])
    assert code == 0
    return root


def test_chat_streams_the_same_answers_as_generate(finished_run):
    from tunesmith.infer.generate import generate, load_base, load_run, template_prompt

    client = TestClient(create_app(finished_run))
    prompt = "What is 3 plus one?"
    streamed = {side: client.post("/api/chat", json={"run": "tuned", "side": side, "prompt": prompt,
                                                     "max_new_tokens": 12}).text for side in ("base", "tuned")}
    tuned = load_run(finished_run / "tuned", device="cpu")
    from tunesmith import config as config_module

    run_config = config_module.load(finished_run / "tuned" / "config.yaml")
    base = load_base(run_config.model, run_config.data.template, device="cpu")
    for side, loaded in (("base", base), ("tuned", tuned)):
        expected = generate(loaded, [template_prompt(loaded, prompt)], max_new_tokens=12)[0]
        assert streamed[side].strip() == expected
    assert streamed["base"] != streamed["tuned"]  # the adapter is really in the tuned one


def test_chat_continues_each_sides_own_conversation(finished_run, monkeypatch):
    from tunesmith import config as config_module
    from tunesmith.infer.generate import conversation_prompt, load_base
    from tunesmith.studio import chat

    prompts = []  # the prompt ids each answer is decoded from
    pieces = chat._pieces
    monkeypatch.setattr(chat, "_pieces", lambda loaded, lock, request, engine: prompts.append(request.prompt_ids)
                        or pieces(loaded, lock, request, engine))
    client = TestClient(create_app(finished_run))
    first, second = "What is 3 plus one?", "And what is 5 plus one?"
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": "It is 4."}]
    reply = client.post("/api/chat", json={"run": "tuned", "side": "base", "prompt": second, "history": history,
                                           "max_new_tokens": 12})
    assert reply.status_code == 200 and reply.headers["X-Dropped-Turns"] == "0"
    run_config = config_module.load(finished_run / "tuned" / "config.yaml")
    base = load_base(run_config.model, run_config.data.template, device="cpu")
    assert base.template.name == "chat"  # a single-turn template reads the last message only, by design
    conversation = [*history, {"role": "user", "content": second}]
    assert prompts == [base.encoder.encode_prompt(conversation_prompt(base, conversation))]  # as `tunesmith chat`
    assert len(prompts[0]) > len(base.encoder.encode_prompt(conversation_prompt(base, conversation[-1:])))

    long_turns = [{"role": role, "content": "seven plus one " * 4} for _ in range(6) for role in ("user", "assistant")]
    with client.stream("POST", "/api/chat", json={"run": "tuned", "prompt": second, "history": long_turns,
                                                  "max_new_tokens": 1990}) as squeezed:  # ~58 tokens of context left
        assert squeezed.status_code == 200 and int(squeezed.headers["X-Dropped-Turns"]) >= 1
    too_long = client.post("/api/chat", json={"run": "tuned", "prompt": "seven plus one " * 40, "max_new_tokens": 1990})
    assert too_long.status_code == 400 and "too long" in too_long.json()["problems"][0]


def test_a_chat_turn_reads_the_earlier_turns_from_the_models_prompt_cache(finished_run, monkeypatch):
    """Each model keeps one engine between answers: the second turn's prompt begins with the first
    turn's prompt and answer, which that engine's prompt cache holds."""
    from tunesmith.studio import chat

    engines = []
    engine_of = chat.Models.engine
    monkeypatch.setattr(chat.Models, "engine", lambda *a, **k: engines.append(engine_of(*a, **k)) or engines[-1])
    client = TestClient(create_app(finished_run))
    first, second = "What is 3 plus one?", "And what is 5 plus one?"
    answer = client.post("/api/chat", json={"run": "tuned", "side": "base", "prompt": first, "max_new_tokens": 8}).text
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer.strip()}]
    client.post("/api/chat", json={"run": "tuned", "side": "base", "prompt": second, "history": history,
                                   "max_new_tokens": 8})
    assert len(engines) == 2 and engines[0] is engines[1]
    assert engines[0].prompts.hits == 1 and engines[0].prompts.tokens_reused > 16


@pytest.mark.parametrize("history", ["not a list", [{"role": "user", "content": "q"}],
                                     [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
                                     [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}],
                                     [{"role": "user", "content": "q"}, "an answer"]])
def test_chat_refuses_a_history_that_is_not_whole_turns(finished_run, history):
    client = TestClient(create_app(finished_run))
    refused = client.post("/api/chat", json={"run": "tuned", "prompt": "x", "history": history})
    assert refused.status_code == 400 and "history" in refused.json()["problems"][0]


def test_chat_refuses_bad_requests_with_4xx(finished_run):
    client = TestClient(create_app(finished_run))
    assert client.post("/api/chat", json={"run": "tuned", "side": "neither", "prompt": "x"}).status_code == 400
    assert client.post("/api/chat", json={"run": "tuned", "prompt": "  "}).status_code == 400
    assert client.post("/api/chat", json={"run": "tuned", "prompt": "x", "temperature": 9}).status_code == 400
    assert client.post("/api/chat", json={"run": "missing", "prompt": "x"}).status_code == 404
    assert client.post("/api/chat", json=["not", "an", "object"]).status_code == 400
    assert client.post("/api/chat", content=b"{half").status_code == 400
    assert client.post("/api/check", content=b"{half").json() == {"problems": ["the request body is not JSON"]}


def predictions(folder: Path, rows: list[tuple[str, bool, str, bool]]) -> None:
    (folder / "eval").mkdir()
    (folder / "eval" / "predictions.jsonl").write_text("".join(json.dumps(
        {"where": f"qa.jsonl:{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "reference": "r",
         "base": base, "base_exact_match": float(base_right), "tuned": tuned, "tuned_exact_match": float(tuned_right)})
        + "\n" for i, (base, base_right, tuned, tuned_right) in enumerate(rows)))
    (folder / "eval" / "results.json").write_text(json.dumps({"base": {"exact_match": 0.5}, "tuned": {"exact_match": 0.6}}))


def test_compare_shows_differences_and_filters_rows(studio):
    root, client = studio
    a = fake_run(root, "a", {"method": "lora", "train": {"learning_rate": 1e-4, "seed": 1}, "out_dir": "x"}, CURVE, ("final",))
    b = fake_run(root, "b", {"method": "lora", "train": {"learning_rate": 3e-4, "seed": 1}, "out_dir": "y",
                             "lora": {"r": 16}}, CURVE, ("final",))  # a key a at its default: no difference
    predictions(a, [("r", True, "r", True), ("w", False, "r", True), ("r", True, "r", True)])
    predictions(b, [("r", True, "w", False), ("w", False, "w", False), ("r", True, "r", True)])
    c = client.get("/api/compare?run=a&run=b").json()
    assert c["differences"] == [{"key": "train.learning_rate", "values": [1e-4, 3e-4]}]
    assert c["total"] == 3 and len(c["curves"]) == 2
    assert client.get("/api/compare?run=a&run=b&filter=failures").json()["total"] == 2
    regressions = client.get("/api/compare?run=a&run=b&filter=regressions").json()
    assert [r["where"] for r in regressions["rows"]] == ["qa.jsonl:0"]
    assert regressions["rows"][0]["runs"] == [{"answer": "r", "right": True}, {"answer": "w", "right": False}]
    assert client.get("/api/compare?run=a").status_code == 400
    assert client.get("/api/compare?run=a&run=zzz").status_code == 404


def test_upload_keeps_the_file_and_refuses_odd_names(studio):
    root, client = studio
    done = client.put("/api/upload/my-data.jsonl", content=b'{"q": 1}\n').json()
    assert (root / done["path"]).read_bytes() == b'{"q": 1}\n' and done["bytes"] == 9
    assert client.put("/api/upload/.hidden", content=b"x").status_code == 400


def test_key_guards_everything_but_the_page(tmp_path):
    client = TestClient(create_app(tmp_path, api_key="s3cret"))
    assert client.get("/").status_code == 200
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs?token=s3cret").status_code == 200
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_studio_refuses_other_hosts_without_a_key(cli, tmp_path):
    result = cli("studio", "--host", "0.0.0.0", "--runs", tmp_path)
    assert result.code == 2 and "--api-key" in result.err
    result = cli("studio", "--runs", tmp_path / "file", "--port", "0")
    assert result.code == 2 and "--port 0" in result.err


def test_merge_from_the_page_and_the_exports_check_shown(finished_run):
    client = TestClient(create_app(finished_run))
    started = client.post("/api/runs/tuned/merge").json()
    assert started["command"] == f"tunesmith merge {finished_run.resolve() / 'tuned'}"
    deadline = time.time() + 300  # about 10 s alone; CI once took over 120 s with the other worker busy
    while (job := client.get("/api/runs/tuned").json()["job"])["running"] and time.time() < deadline:
        time.sleep(0.3)
    assert job["exit_code"] == 0 and (finished_run / "tuned" / "merged" / "config.json").is_file()
    export = finished_run / "tuned" / "export-f16"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"file": "tuned.f16.gguf", "type": "f16", "check": {
        "prompts": 20, "same_answers": 19, "agreement": 0.95}}))
    assert client.get("/api/runs/tuned").json()["export"] == [
        {"folder": "export-f16", "file": "tuned.f16.gguf", "type": "f16", "agreement": 0.95, "prompts": 20,
         "same_answers": 19}]
    assert client.post("/api/runs/tuned/publish").status_code == 404
    assert client.post("/api/runs/tuned/export?type=q3_bogus").status_code == 400


def test_a_job_that_just_ended_is_running_until_its_exit_is_recorded(tmp_path, monkeypatch):
    from tunesmith.studio import jobs

    recording, release = threading.Event(), threading.Event()
    save = jobs.Jobs.save

    def slow_save(self, job):
        if job.exit_code is not None:  # the exit is known but not yet on disk: a page reads now
            recording.set()
            release.wait(30)
        save(self, job)

    monkeypatch.setattr(jobs.Jobs, "save", slow_save)
    studio_jobs = jobs.Jobs(tmp_path, tmp_path)
    job = studio_jobs.start("merge", "missing", [str(tmp_path / "missing")])
    assert recording.wait(120)
    seen = studio_jobs.get(job.id)
    assert seen.exit_code is None and jobs.alive(seen)  # not "neither running nor ended"
    release.set()
    deadline = time.time() + 30
    while studio_jobs.get(job.id).exit_code is None and time.time() < deadline:
        time.sleep(0.05)
    ended = studio_jobs.get(job.id)
    assert ended.exit_code == 2 and not jobs.alive(ended) and "missing" in ended.error
    assert not Path(f"/proc/{job.pid}").exists()  # reaped once recorded
