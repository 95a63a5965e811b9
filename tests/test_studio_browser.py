"""The studio in a real browser (headless Chromium from Debian, driven by Playwright): open the page,
see a bad config value's error, check the data, start a tiny run and watch its curve grow, evaluate
it, compare it with a second run, chat with base and tuned side by side, and see a deleted run's
message. `.ci/run` installs Chromium and sets TUNESMITH_BROWSER_TESTS=1, which makes a missing
browser a failure instead of a skip."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, qa_rows, write_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("TUNESMITH_BROWSER_TESTS") == "1"
SCREENSHOTS = os.environ.get("TUNESMITH_SCREENSHOTS")  # a folder: save each page there (README pictures)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
if (sync_playwright is None or not Path(CHROMIUM).exists()) and not REQUIRED:
    pytest.skip("needs playwright and Debian's chromium (apt-get install chromium); CI installs both",
                allow_module_level=True)

pytestmark = pytest.mark.slow
expect.set_options(timeout=120_000)  # training and evaluating take seconds, not the default 5
FAST = {"train.batch_size": "2", "train.micro_batch_size": "2", "train.warmup_steps": "0", "train.eval_interval": "10",
        "train.eval_iters": "2", "train.precision": "fp32", "train.device": "cpu", "train.log_interval": "1",
        "train.learning_rate": "0.03", "eval.max_new_tokens": "6"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", "studio", "--runs", str(root), "--port", str(port)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/api/runs", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read()) from None
            time.sleep(0.3)
    yield url, root
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(120_000)
        yield tab
        browser.close()


def snap(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


def fill_form(page, name: str, values: dict[str, str]) -> None:
    page.fill("#f-name", name)
    for key, value in values.items():
        selector = "#f-" + key.replace(".", "-")
        if page.locator(selector).evaluate("e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            if not page.locator(selector).is_visible():  # in a folded section
                page.locator(selector).evaluate("e => e.closest('details').open = true")
            page.fill(selector, value)


def loss_points(page) -> int:
    line = page.locator('svg[data-chart="loss"] polyline[data-series="loss"]')
    return int(line.get_attribute("data-count")) if line.count() else 0


def test_the_whole_job_in_the_browser(server, page, llama, tmp_path):
    url, root = server
    page.goto(url)
    expect(page.locator("#runs-empty")).to_be_visible()

    # a bad value: the CLI's one-line error on the page, nothing started
    page.goto(url + "/#new")
    fill_form(page, "first", {"model": str(llama), "train.learning_rate": "fast"})
    page.click("#check")
    expect(page.locator("#problems")).to_contain_text("train.learning_rate")
    assert not (root / "first").exists()

    # the data uploaded through the page, the doctor's verdict and plot, the memory estimate
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(60))
    page.set_input_files("#upload", str(data))
    expect(page.locator("#upload-note")).to_contain_text("saved as")
    fill_form(page, "first", {**FAST, "model": str(llama), "train.max_steps": "150"})
    page.click("#check")
    expect(page.locator("#doctor")).to_contain_text("ready to train")
    expect(page.locator("#memory")).to_contain_text("fits")
    expect(page.locator("#new-command")).to_contain_text("tunesmith finetune --out_dir=")
    page.wait_for_function("document.querySelector('#doctor-plot') && document.querySelector('#doctor-plot').naturalWidth > 0")
    snap(page, "new-run")

    # start: the run's page, its curve growing while it trains, then finished
    page.click("#start")
    page.wait_for_url("**/#run/first")
    page.wait_for_function("() => { const l = document.querySelector('svg[data-chart=loss] polyline[data-series=loss]');"
                           " return l && Number(l.dataset.count) >= 3; }")
    seen = loss_points(page)
    if seen < 150:  # a busy machine's page may first look when the run is already done: nothing left to grow
        page.wait_for_function(f"() => Number(document.querySelector('svg[data-chart=loss] "
                               f"polyline[data-series=loss]').dataset.count) > {seen}")
    expect(page.locator("#run-status")).to_contain_text("finished")
    assert loss_points(page) == 150
    expect(page.locator('svg[data-chart="loss"] polyline[data-series="val_loss"]')).to_have_count(1)

    # evaluate from the page: the base-vs-tuned table
    page.click("#act-evaluate")
    expect(page.locator("#eval-table")).to_contain_text("exact_match")
    expect(page.locator("#diagnosis")).to_contain_text("Diagnosis")
    snap(page, "run")

    # a second run with another learning rate, then both side by side
    page.goto(url + "/#new")
    fill_form(page, "second", {**FAST, "model": str(llama), "data.path": str(data), "train.max_steps": "40",
                               "train.learning_rate": "0.001"})
    page.click("#check")
    expect(page.locator("#doctor")).to_contain_text("ready to train")
    page.click("#start")
    page.wait_for_url("**/#run/second")
    expect(page.locator("#run-status")).to_contain_text("finished")
    page.click("#act-evaluate")
    expect(page.locator("#eval-table")).to_contain_text("exact_match")

    page.goto(url + "/#compare")
    page.check('#compare-picks input[value="first"]')
    page.check('#compare-picks input[value="second"]')
    page.click("#compare-go")
    expect(page.locator("#compare-diff")).to_contain_text("train.learning_rate")
    expect(page.locator("#compare-diff")).to_contain_text("train.max_steps")
    expect(page.locator('svg[data-chart="compare-loss"] polyline')).to_have_count(2)
    rows = page.locator("#compare-answers tr[data-where]").count()
    assert rows > 0
    page.select_option("#compare-filter", "failures")
    expect(page.locator("#compare-count")).to_contain_text("held-out rows shown")
    snap(page, "compare")

    # chat: the same prompt to base and tuned, both streamed in
    page.goto(url + "/#chat")
    page.wait_for_function("document.querySelectorAll('#chat-run option').length >= 2")
    page.select_option("#chat-run", "first")
    page.fill("#chat-prompt", "What is 7 plus one?")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-base').dataset.done && "
                           "document.querySelector('#chat-tuned').dataset.done")
    def answer(side: str, prompt: str, history: list[dict]) -> str:
        request = urllib.request.Request(url + "/api/chat", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"run": "first", "side": side, "prompt": prompt,
                                                          "history": history, "max_new_tokens": 128}).encode())
        return urllib.request.urlopen(request).read().decode()

    shown = {}
    for side in ("base", "tuned"):  # what the page shows is the whole greedy answer the server streams
        shown[side] = page.locator(f"#chat-{side} .answer").last.text_content()
        assert shown[side] == answer(side, "What is 7 plus one?", [])
    # a second message continues each side's own conversation
    page.fill("#chat-prompt", "And 8 plus one?")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-base').dataset.done && "
                           "document.querySelector('#chat-tuned').dataset.done")
    expect(page.locator("#chat-turns")).to_have_text("2 turn(s) in this conversation")
    for side in ("base", "tuned"):
        expect(page.locator(f"#chat-{side} .you")).to_have_text(["What is 7 plus one?", "And 8 plus one?"])
        history = [{"role": "user", "content": "What is 7 plus one?"}, {"role": "assistant", "content": shown[side]}]
        assert page.locator(f"#chat-{side} .answer").last.text_content() == answer(side, "And 8 plus one?", history)
    snap(page, "chat")
    page.click("#chat-new")
    expect(page.locator("#chat-base .answer")).to_have_count(0)

    # the runs list, then a run deleted while its page is open: a message, no traceback
    page.goto(url + "/#runs")
    expect(page.locator('tr[data-run="first"] .status')).to_have_text("finished")
    expect(page.locator('tr[data-run="second"] .status')).to_have_text("finished")
    snap(page, "runs")
    page.goto(url + "/#run/second")
    expect(page.locator("#run-status")).to_contain_text("finished")
    shutil.rmtree(root / "second")
    expect(page.locator("#run-error")).to_contain_text("no run 'second'")
