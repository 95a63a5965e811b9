"""Does the exported file answer as the run does? The demo's task on the embedded SmolLM2-135M:
a LoRA run (the demo's settings), exported as every GGUF type and as a LoRA GGUF, each file
checked by tunesmith export itself in llama.cpp's library on the run's held-out prompts.

    .venv/bin/python bench/export_check.py [--steps 20] [--samples 20] [--write]

Prints one row per type (identical greedy answers, template/token checks, answers that ran past
the stop, file size, export seconds) and, with --write, replaces the "Export" section of
bench/RESULTS.md. Run it alone: another busy process changes the seconds, not the answers.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]


def tunesmith(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, cwd=ROOT,
                          check=False)


def train(run: Path, steps: int) -> None:
    """The demo's data and settings (tunesmith/demo.py), trained once."""
    from tunesmith.demo import demo_config, make_rows
    from tunesmith.finetune import finetune

    if (run / "final").is_dir():
        return
    run.mkdir(parents=True, exist_ok=True)
    rows = make_rows(3000, seed=1234)
    (run / "dates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune(demo_config(run, 3000, steps))


def export(run: Path, kind: str, fmt: str, samples: int) -> dict:
    started = time.monotonic()
    done = tunesmith("export", str(run), "--format", fmt, "--type", kind, "--samples", str(samples),
                     "--min-agreement", "0")
    seconds = time.monotonic() - started
    folder = run / (f"export-{kind}" if fmt == "gguf" else f"export-lora-{kind}")
    if done.returncode != 0:
        return {"format": fmt, "type": kind, "error": done.stderr.strip().splitlines()[-1]}
    report = json.loads((folder / "export.json").read_text())
    size_mb = (folder / report["file"]).stat().st_size / 2**20
    return {"format": fmt, "type": kind, **report["check"], "size_mb": round(size_mb, 1),
            "seconds": round(seconds, 1)}


def table(results: list[dict]) -> list[str]:
    lines = ["| format | type | identical greedy answers | template as trained | token ids equal | "
             "past the stop | file MB | export + check s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['type']} | error: {r['error']} |  |  |  |  |  |")
            continue
        lines.append(f"| {r['format']} | {r['type']} | {r['same_answers']}/{r['prompts']} ({100 * r['agreement']:.0f}%) "
                     f"| {r['prompts'] - r['template_differs']}/{r['prompts']} | {r['prompts'] - r['tokens_differ']}/"
                     f"{r['prompts']} | {r['runaways']} | {r['size_mb']} | {r['seconds']} |")
    return lines


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def write_section(lines: list[str], command: str) -> None:
    import llama_cpp

    results_file = ROOT / "bench" / "RESULTS.md"
    text = results_file.read_text()
    head = ["## Export: the file answers in llama.cpp as the run does", "",
            f"`{command}` on {time.strftime('%Y-%m-%d')}: the demo's LoRA run (SmolLM2-135M-Instruct, dates "
            "task), each file made by llama.cpp's converter / quantizer and checked by `tunesmith export` in "
            f"llama.cpp's library (llama-cpp-python {llama_cpp.__version__}) on the run's held-out prompts, "
            f"greedy, next to tunesmith's fp32 answers. {platform.machine()}, {cpu_name()}.", ""]
    section = "\n".join(head + lines) + "\n"
    start = text.find("## Export: ")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    results_file.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="out/bench-export", help="run directory (trained if missing)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    run = (ROOT / args.run).resolve()
    train(run, args.steps)
    results = [export(run, kind, "gguf", args.samples) for kind in TYPES]
    results.append(export(run, "f16", "gguf-lora", args.samples))
    lines = table(results)
    print("\n".join(lines))
    if args.write:
        write_section(lines, "python bench/export_check.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
