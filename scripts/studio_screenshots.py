"""The README's pictures of the studio: each page of a running studio, saved as PNG.

    tunesmith studio --runs out &
    python scripts/studio_screenshots.py --url http://127.0.0.1:7860 --run RUN --other RUN2 \
        --data PATH --prompt "..." [--prompt "a follow-up" ...] [--pages chat] --out docs/studio

Drives Debian's Chromium through Playwright, as tests/test_studio_browser.py does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

PAGES = ["runs", "run", "new-run", "compare", "chat"]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--run", required=True, help="a finished, evaluated run")
    parser.add_argument("--other", required=True, help="a second run to compare it with")
    parser.add_argument("--data", required=True, help="a data path for the New-run page's check")
    parser.add_argument("--prompt", required=True, action="append", help="asked in the Chat page (again: a follow-up)")
    parser.add_argument("--pages", nargs="+", default=PAGES, choices=PAGES, help="the pictures to take")
    parser.add_argument("--out", default="docs/studio")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=300_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        for name in args.pages:
            SHOTS[name](page, args)
            page.screenshot(path=str(out / f"{name}.png"))
        browser.close()


def runs(page, args) -> None:
    page.goto(args.url + "/#runs")
    expect(page.locator(f'tr[data-run="{args.run}"]')).to_be_visible()


def run(page, args) -> None:
    page.goto(args.url + f"/#run/{args.run}")
    expect(page.locator("#eval-table")).to_be_visible()


def new_run(page, args) -> None:
    page.goto(args.url + "/#new")
    page.fill("#f-name", "new-run")
    page.fill("#f-data-path", args.data)
    page.click("#check")
    expect(page.locator("#memory")).to_contain_text("fits")
    page.locator("#doctor").scroll_into_view_if_needed()


def compare(page, args) -> None:
    page.goto(args.url + "/#compare")
    page.check(f'#compare-picks input[value="{args.run}"]')
    page.check(f'#compare-picks input[value="{args.other}"]')
    page.click("#compare-go")
    expect(page.locator("#compare-diff")).to_contain_text("learning_rate")


def chat(page, args) -> None:
    page.goto(args.url + "/#chat")
    page.wait_for_function("document.querySelectorAll('#chat-run option').length >= 1")
    page.select_option("#chat-run", args.run)
    for prompt in args.prompt:  # the first question, then any follow-ups in the same conversation
        page.fill("#chat-prompt", prompt)
        page.click("#chat-send")
        page.wait_for_function("document.querySelector('#chat-base').dataset.done && "
                               "document.querySelector('#chat-tuned').dataset.done && "
                               "!document.querySelector('#chat-send').disabled")


SHOTS = {"runs": runs, "run": run, "new-run": new_run, "compare": compare, "chat": chat}


if __name__ == "__main__":
    main()
