"""Load on `tunesmith serve`: N concurrent clients for T seconds, each sending streamed chat
completions back to back, round-robin over the served models (base and adapters).

    .venv/bin/python bench/serve_load.py --model smollm2-135m [--adapter NAME=RUN ...] --clients 8 --seconds 60
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000/v1 [--api-key KEY] ...

With --model the script starts the server itself on a free loopback port and stops it at the end;
with --url it uses one already running. Only loopback addresses are accepted, and the load is
bounded (clients, seconds and max_tokens are capped): this measures a server, it does not flood
one. Clients start no new request after T seconds; requests already running finish. The 8 questions
repeat, so a server that keeps what it read (a prompt cache: llama.cpp's, tunesmith's) reads a
repeated one only at its end; --unique tags every question with its client and turn, so that only
the system text before the tag can be reused.

Reports completed requests per second, completion tokens per second (the server's usage counts),
latency p50/p99 (request sent to [DONE]), time to first token p50/p99, and errors: any non-200
answer, broken stream or missing [DONE] is one; a healthy server has none. --results FILE writes
the table into that file's "## Serving" section (created if missing), leaving the rest alone.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
MAX_CLIENTS, MAX_SECONDS, MAX_TOKENS = 64, 600, 512
QUESTIONS = [
    "What is 12 March 2020 in ISO 8601 format?",
    "Give me three tips for writing readable Python.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about compilers.",
    "What is the difference between a process and a thread?",
    "Convert the 5th of March, 2021 to YYYY-MM-DD.",
    "Name three prime numbers larger than 50.",
    "Summarise what HTTP status 429 means.",
]


@dataclass
class Sample:
    model: str
    ok: bool
    latency_s: float
    first_token_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)


def loopback_only(url: str) -> tuple[str, int, str]:
    parsed = urlparse(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise SystemExit(f"--url {url}: give http://HOST:PORT/v1 on this machine")
    addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, parsed.port or 80)}
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"--url {url}: {parsed.hostname} is not a loopback address; this benchmark only "
                         "loads a server on this machine")
    return parsed.hostname, parsed.port or 80, parsed.path.rstrip("/") or "/v1"


def one_request(host: str, port: int, path: str, headers: dict, model: str, question: str, max_tokens: int) -> Sample:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0.7, "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True}})
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=300)
    try:
        connection.request("POST", f"{path}/chat/completions", body, headers)
        response = connection.getresponse()
        if response.status != 200:
            return Sample(model, False, time.perf_counter() - started, error=f"HTTP {response.status}: "
                          f"{response.read()[:200].decode(errors='replace')}")
        return read_stream(response, model, started)
    except (OSError, http.client.HTTPException) as err:
        return Sample(model, False, time.perf_counter() - started, error=f"{type(err).__name__}: {err}")
    finally:
        connection.close()


def read_stream(response, model: str, started: float) -> Sample:
    first, usage, done = None, None, False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:
            return Sample(model, False, time.perf_counter() - started, error=event["error"]["message"])
        if event.get("usage"):
            usage = event["usage"]
        if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
            first = time.perf_counter() - started
    latency = time.perf_counter() - started
    if not done or usage is None:
        return Sample(model, False, latency, error="stream ended without usage and [DONE]")
    return Sample(model, True, latency, first, usage["completion_tokens"], usage["prompt_tokens"])


def client_loop(index: int, deadline: float, target: tuple, headers: dict, models: list[str], max_tokens: int,
                load: Load, unique: bool = False) -> None:
    turn = index
    while time.perf_counter() < deadline:
        model, question = models[turn % len(models)], QUESTIONS[turn % len(QUESTIONS)]
        if unique:  # no prompt repeats: a server's prompt cache can reuse only the system text before this tag
            question = f"[{index}.{turn}] {question}"
        load.add(one_request(*target, headers, model, question, max_tokens))
        turn += 1


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (p99 of 50 values is the largest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summarise(load: Load, elapsed_s: float) -> dict:
    good = [s for s in load.samples if s.ok]
    latencies = [s.latency_s for s in good]
    first_tokens = [s.first_token_s for s in good if s.first_token_s is not None]
    return {"requests": len(good), "errors": len(load.samples) - len(good), "seconds": elapsed_s,
            "requests_per_s": len(good) / elapsed_s, "completion_tokens": sum(s.completion_tokens for s in good),
            "completion_tokens_per_s": sum(s.completion_tokens for s in good) / elapsed_s,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
            "first_token_p50_s": percentile(first_tokens, 0.5), "first_token_p99_s": percentile(first_tokens, 0.99),
            "per_model": {m: sum(1 for s in good if s.model == m) for m in sorted({s.model for s in load.samples})},
            "first_errors": sorted({s.error for s in load.samples if not s.ok})[:5]}


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tunesmith", "serve", "--model", args.model, "--port", "0",
               "--max-batch-size", str(args.max_batch_size), "--max-queue", str(max(64, 2 * args.clients))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    for adapter in args.adapter:
        command += ["--adapter", adapter]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in process.stderr:
        sys.stderr.write("  server: " + line)
        if line.startswith("Serving "):
            threading.Thread(target=lambda: [sys.stderr.write("  server: " + rest) for rest in process.stderr],
                             daemon=True).start()  # keep draining (and showing) the server's log
            return process, line.split(" on ")[1].split()[0]
    raise SystemExit(f"the server exited with code {process.wait()} before listening")


def served_models(target: tuple, headers: dict) -> list[str]:
    connection = http.client.HTTPConnection(target[0], target[1], timeout=30)
    connection.request("GET", f"{target[2]}/models", headers=headers)
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"GET /models answered {response.status}: {response.read()[:200]!r}")
    return [m["id"] for m in json.loads(response.read())["data"]]


def markdown(summary: dict, args, models: list[str]) -> str:
    threads = f", server threads {args.threads}" if args.threads else ""
    setting = (f"{args.clients} clients x {args.seconds:.0f} s{', unique prompts' if args.unique else ''}, "
               f"max_tokens {args.max_tokens}, server batch "
               f"{args.max_batch_size}{threads}, models round-robin: {', '.join(models)}")
    row = (f"| {summary['requests']} | {summary['errors']} | {summary['requests_per_s']:.2f} | "
           f"{summary['completion_tokens_per_s']:.1f} | {summary['latency_p50_s']:.2f} | {summary['latency_p99_s']:.2f} | "
           f"{summary['first_token_p50_s']:.2f} | {summary['first_token_p99_s']:.2f} |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    return "\n".join([
        f"`bench/serve_load.py` on {datetime.date.today()} ({machine}): {setting}.", "",
        ("| requests | errors | requests/s | completion tokens/s | latency p50 s | latency p99 s "
         "| first token p50 s | first token p99 s |"),
        "|---|---|---|---|---|---|---|---|", row, "",
        f"Requests per model: {', '.join(f'{m} {n}' for m, n in summary['per_model'].items())}."])


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the '## Serving' section of a shared results file, nothing else."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    section = f"## Serving\n\n{body.strip()}\n"
    start = text.find("\n## Serving\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's base URL (loopback only), e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="start a server for this base model instead")
    parser.add_argument("--adapter", action="append", default=[], help="[NAME=]RUN for the started server")
    parser.add_argument("--api-key", default=os.environ.get("TUNESMITH_API_KEY"))
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=60, help=f"how long clients send (at most {MAX_SECONDS})")
    parser.add_argument("--max-tokens", type=int, default=64, help=f"per answer (at most {MAX_TOKENS})")
    parser.add_argument("--max-batch-size", type=int, default=8, help="server batch, for a started server")
    parser.add_argument("--threads", type=int, help="the started server's CPU threads (default: torch's choice)")
    parser.add_argument("--unique", action="store_true",
                        help="every question tagged with its client and turn, so that no prompt is sent twice")
    parser.add_argument("--results", type=Path, help="write the table into this file's '## Serving' section")
    args = parser.parse_args()
    if bool(args.url) == bool(args.model):
        raise SystemExit("give --url of a running server or --model to start one")
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS and 1 <= args.max_tokens <= MAX_TOKENS):
        raise SystemExit(f"bounds: 1..{MAX_CLIENTS} clients, up to {MAX_SECONDS} s, 1..{MAX_TOKENS} max_tokens")
    process, url = start_server(args) if args.model else (None, args.url)
    try:
        target = loopback_only(url)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})}
        models = served_models(target, headers)
        load, started = Load(), time.perf_counter()
        deadline = started + args.seconds
        clients = [threading.Thread(target=client_loop,
                                    args=(i, deadline, target, headers, models, args.max_tokens, load, args.unique))
                   for i in range(args.clients)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        summary = summarise(load, time.perf_counter() - started)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print(json.dumps(summary, indent=2))
    table = markdown(summary, args, models)
    print(table)
    if args.results:
        write_section(args.results, table)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
