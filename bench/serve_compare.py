"""tunesmith serve and llama.cpp's llama-server side by side on the same weights, one after the
other, through bench/serve_load.py at several client counts.

    .venv/bin/python bench/serve_compare.py --merged RUN/merged --gguf RUN/export-f16/RUN.f16.gguf \
        [--clients 1 8 64] [--seconds 30] [--batch 32] [--rounds 2] [--unique]

--merged is `tunesmith merge RUN` (served by tunesmith in the precision auto picks), --gguf the same run exported by
`tunesmith export RUN --type f16` (served by llama-server, built once by bench/llama_server.py).
Both get the same batch size / parallel slots and their default CPU threads. Both servers stay up
(idle, neither spins) and take turns: for each client count, --rounds runs of each, alternating
(the first one swapped every round), so that a VM's drift does not favour one; the medians and
every run are printed. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("tunesmith", "llama.cpp")
sys.path.insert(0, str(ROOT / "bench"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not come up")


def start(kind: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "tunesmith":
        command = [sys.executable, "-m", "tunesmith", "serve", "--model", str(args.merged), "--port", str(port),
                   "--max-batch-size", str(args.batch)]
    else:
        from llama_server import build

        command = [str(build()), "-m", str(args.gguf), "--port", str(port), "--host", "127.0.0.1", "--jinja",
                   "--parallel", str(args.batch), "--ctx-size", str(1024 * args.batch)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, process)
    return process, url


def load(url: str, clients: int, seconds: float, unique: bool) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", url, "--clients",
                           str(clients), "--seconds", str(seconds), *(["--unique"] if unique else [])],
                          capture_output=True, text=True, check=False)
    text = done.stdout
    return json.loads(text[: text.index("\n}") + 2])


def row(server: str, clients: int, s: dict) -> str:
    return (f"| {server} | {clients} | {s['requests']} | {s['errors']} | {s['requests_per_s']:.2f} | "
            f"{s['completion_tokens_per_s']:.1f} | {s['latency_p50_s']:.2f} | {s['first_token_p50_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each server per client count")
    parser.add_argument("--unique", action="store_true", help="no prompt sent twice (serve_load.py --unique)")
    args = parser.parse_args()
    lines = [("| server | clients | requests | errors | requests/s | completion tokens/s | latency p50 s | "
              "first token p50 s |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    servers = {kind: start(kind, args) for kind in KINDS}  # both up (idle, they wait without spinning)
    summary = []
    try:
        for clients in args.clients:
            rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for round_ in range(args.rounds):  # alternating, the first one swapped each round
                for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
                    result = load(servers[kind][1], clients, args.seconds, args.unique)
                    rates[kind].append(result["requests_per_s"])
                    lines.append(row(kind, clients, result))
                    print(lines[-1], flush=True)
            medians = {kind: statistics.median(rates[kind]) for kind in KINDS}
            summary.append(f"{clients} clients: median requests/s tunesmith {medians['tunesmith']:.2f} "
                           f"({', '.join(f'{r:.2f}' for r in rates['tunesmith'])}), llama.cpp "
                           f"{medians['llama.cpp']:.2f} ({', '.join(f'{r:.2f}' for r in rates['llama.cpp'])}): "
                           f"llama.cpp / tunesmith {medians['llama.cpp'] / medians['tunesmith']:.2f}x")
            print(summary[-1], flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    print("\n".join(lines + [""] + summary))


if __name__ == "__main__":
    main()
