"""Render a run's report.html in headless Chromium (Debian's `chromium` package) and check it as a
browser shows it: every section is in the rendered DOM, every embedded image decodes, and a
screenshot is written next to the report (report.png) to look at.

    apt-get install chromium          # once; the test suite does not need it
    .venv/bin/python scripts/check_report.py out/<run>       # or a path to report.html

Exit code 0 when the page renders with all sections and images; 1 otherwise (what failed is printed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tunesmith.report import SECTIONS

# Appended to a temporary copy only: after load, write how many images decoded into the DOM.
PROBE = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
         "const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
         "document.body.setAttribute('data-images',ok+'/'+imgs.length);});</script>")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("chromium not found: apt-get install chromium")


def render(report: Path, browser: str) -> tuple[str, Path]:
    with tempfile.TemporaryDirectory() as folder:
        probe_copy = Path(folder) / "report.html"
        probe_copy.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                              encoding="utf-8")
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={folder}/profile"]
        dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", probe_copy.as_uri()],
                             capture_output=True, text=True, timeout=120, check=False).stdout
    screenshot = report.with_name("report.png")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--window-size=1200,5200",
                        f"--screenshot={screenshot}", report.resolve().as_uri()],
                       capture_output=True, timeout=120, check=False)
    return dom, screenshot


def check(dom: str, screenshot: Path) -> list[str]:
    problems = [f"section #{key} ({title}) missing from the rendered page" for key, title in SECTIONS
                if f'id="{key}"' not in dom]
    images = re.search(r'data-images="(\d+)/(\d+)"', dom)
    if not images:
        problems.append("the page did not finish loading (no image count)")
    elif images.group(1) != images.group(2) or images.group(2) == "0":
        problems.append(f"images decoded: {images.group(1)} of {images.group(2)}")
    if not screenshot.is_file() or screenshot.stat().st_size < 10_000:
        problems.append("no screenshot, or an empty one")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    target = Path(argv[0])
    report = target / "report.html" if target.is_dir() else target
    if not report.is_file():
        print(f"{report} not found: run tunesmith report RUN first")
        return 2
    dom, screenshot = render(report, chromium())
    problems = check(dom, screenshot)
    images = re.search(r'data-images="(\d+)/(\d+)"', dom)
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"OK: {len(SECTIONS)} sections rendered, {images.group(1)} images decoded; screenshot {screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
