"""`tunesmith serve`: an OpenAI-compatible HTTP server for a base model and its fine-tuned runs.

    tunesmith serve --model smollm2-135m --adapter dates=out/dates --adapter out/sql
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "dates", "messages": [{"role": "user", "content": "5 March 2021 in ISO?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both streamed as
server-sent events with "stream": true, both with usage counts), GET /health (readiness).
The request's `model` picks the base or one of the adapters, all loaded once at start. Chat
messages go through the template the run was trained with; /v1/completions takes raw text.
Concurrent requests are decoded together, continuously batched: a new request joins the running
batch at the next token, a finished one leaves it at once (engine.py). Every field is checked at
the edge: prompt length, max_tokens, n, seed, stop strings, body size; a bad request is answered
400 / 413 / 429 with an OpenAI-style error body, never run. Templating and tokenisation run on
worker threads, so a large prompt does not hold up other clients, and a request that fails while
it is decoded fails alone (500), never its neighbours in the batch.
The server listens on 127.0.0.1 unless told otherwise; with an API key (--api-key or
TUNESMITH_API_KEY) every /v1 request must carry `Authorization: Bearer KEY`. /health stays open
so that a load balancer can probe it; it tells nothing but "ok".
"""


import argparse
import asyncio
import hmac
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import PROMPT_CACHE_BYTES, Request, Sampling
from tunesmith.infer.generate import conversation_prompt
from tunesmith.infer.registry import Served, load_models, parse_adapter
from tunesmith.infer.scheduler import Job, QueueFull, Scheduler
from tunesmith.log import say

API_KEY_ENV = "TUNESMITH_API_KEY"
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """Answered as an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int  # longest prompt accepted
    max_tokens: int  # largest max_tokens a request may ask for
    default_max_tokens: int  # answer length when a request does not say
    max_choices: int = 16  # n x prompts in one request
    max_body_bytes: int = 4 << 20  # larger request bodies are refused (413) before they are read whole
    max_stop_strings: int = 4  # as OpenAI's API
    max_stop_chars: int = 256  # length of one stop string


@dataclass
class ServerState:
    models: dict[str, Served]
    scheduler: Scheduler
    limits: Limits
    api_key: str | None
    started: int  # unix time, the `created` of every model

    def lookup(self, name: str) -> Served:
        if name not in self.models:
            raise ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(self.models)}",
                           "model", "model_not_found")
        return self.models[name]


# ---- requests --------------------------------------------------------------------------------

def _request_models():
    """Pydantic models of the request bodies (built on first use: fastapi is an optional extra)."""
    from pydantic import BaseModel, ConfigDict

    class Lenient(BaseModel):
        model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata...)

    class StreamOptions(Lenient):
        include_usage: bool = False

    class Message(Lenient):
        role: str
        content: str | list[dict[str, Any]] | None = None

    class Common(Lenient):
        model: str
        max_tokens: int | None = None
        temperature: float | None = None
        top_p: float | None = None
        top_k: int | None = None  # not in OpenAI's API; as in vLLM
        repetition_penalty: float | None = None  # not in OpenAI's API; as in vLLM
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        stop: str | list[str] | None = None
        n: int = 1
        seed: int | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: Any = None

    class ChatRequest(Common):
        messages: list[Message]
        max_completion_tokens: int | None = None
        tools: list[Any] | None = None

    class CompletionRequest(Common):
        prompt: str | list[str]
        echo: bool = False
        suffix: str | None = None

    return ChatRequest, CompletionRequest


def chat_messages(messages) -> list[dict]:
    """The request's messages as {"role", "content"} with text content, checked."""
    if not messages:
        raise ApiError(400, "messages is empty: give at least one user message", "messages")
    out = []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{index}].role={message.role!r} is not supported "
                           "(system, developer, user, assistant)", f"messages[{index}].role")
        content = unicode_text(_text(message.content, index), f"messages[{index}].content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return out


def _text(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported, not "
                           f"{part.get('type')!r}", f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


def unicode_text(text: str, param: str) -> str:
    """JSON's "\\ud800" escape is valid JSON but not text: a tokenizer cannot read a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{param} is not valid Unicode text (a lone surrogate at character {err.start})",
                       param) from None
    return text


def unsupported(body, chat: bool) -> None:
    if body.logprobs:
        raise ApiError(400, "logprobs is not supported by this server", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (e.g. 1.1)", name)
    if chat and body.tools:
        raise ApiError(400, "tools (function calling) are not supported by this server", "tools")
    if not chat and (body.echo or body.suffix):
        raise ApiError(400, "echo and suffix are not supported by this server", "echo" if body.echo else "suffix")


def check_fields(body, chat: bool, prompts: int, limits: Limits) -> None:
    """What can be refused before any templating or tokenising is done."""
    unsupported(body, chat)
    check_choices(body.n, prompts, limits)
    stop_strings(body.stop, limits)
    problems = Sampling(seed=body.seed).problems()
    if problems:
        raise ApiError(400, problems[0], "seed")


def sampling_for(body, requested: int | None, prompt_lengths: list[int], served: Served, limits: Limits,
                 prompt_param: str) -> Sampling:
    """The sampling settings of a request, with its length limits checked."""
    longest = max(prompt_lengths)
    if min(prompt_lengths) == 0:
        raise ApiError(400, "the prompt is empty", prompt_param)
    if longest > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {longest} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}", prompt_param, "context_length_exceeded")
    if requested is not None and not 1 <= requested <= limits.max_tokens:
        raise ApiError(400, f"max_tokens={requested} must be between 1 and {limits.max_tokens} on this server",
                       "max_tokens")
    context = served.context_length
    room = context - longest if context else limits.default_max_tokens
    max_new = requested if requested is not None else min(limits.default_max_tokens, room)
    if max_new > room or max_new < 1:
        raise ApiError(400, f"the prompt ({longest} tokens) and max_tokens ({max_new}) exceed the model's "
                       f"context of {context} tokens", prompt_param, "context_length_exceeded")
    stop = stop_strings(body.stop, limits)
    sampling = Sampling(max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                        repetition_penalty=body.repetition_penalty or 1.0, stop=stop, seed=body.seed)
    problems = sampling.problems()
    if problems:
        raise ApiError(400, "; ".join(problems), problems[0].split("=")[0].split()[0])
    return sampling


def stop_strings(stop: str | list[str] | None, limits: Limits) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(strings) > limits.max_stop_strings:
        raise ApiError(400, f"stop has {len(strings)} strings; at most {limits.max_stop_strings} are allowed", "stop")
    if any(len(s) > limits.max_stop_chars for s in strings):
        raise ApiError(400, f"a stop string is longer than {limits.max_stop_chars} characters", "stop")
    return strings


def check_choices(n: int, prompts: int, limits: Limits) -> None:
    """n answers to each of `prompts` prompts: checked before any tokenising is done."""
    if n < 1 or prompts * n > limits.max_choices:
        raise ApiError(400, f"n={n} x {prompts} prompt(s) must be between 1 and {limits.max_choices} answers", "n")


# ---- running jobs ----------------------------------------------------------------------------

class Run:
    """The jobs of one HTTP request and the events they send back to its event loop."""

    def __init__(self, state: ServerState, served: Served, prompts: list[list[int]], sampling: Sampling,
                 n: int, stream: bool):
        check_choices(n, len(prompts), state.limits)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.prompts = prompts
        self.jobs = []
        for index in range(len(prompts) * n):
            seed = None if sampling.seed is None else sampling.seed + index % n
            request = Request(prompts[index // n], replace(sampling, seed=seed))
            if stream:
                request.on_text = lambda piece, i=index: self._send(("text", i, piece))
            self.jobs.append(Job(served, request, lambda error, i=index: self._send(("done", i, error))))
        try:
            state.scheduler.submit(self.jobs)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry shortly", None, "queue_full") from None

    def _send(self, event: tuple) -> None:  # from the decoding thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def cancel(self) -> None:
        for job in self.jobs:
            job.request.cancelled = True

    async def wait(self) -> None:
        remaining = len(self.jobs)
        try:
            while remaining:
                kind, _, error = await self.events.get()
                if kind == "done":
                    if error is not None:
                        raise ApiError(500, f"generation failed: {error}")
                    remaining -= 1
        finally:
            self.cancel()  # a no-op once every job is done; stops the decoding if the client left

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(job.request.completion_ids) for job in self.jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _finish_reason(request: Request) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def stream_events(run: Run, head: dict, chat: bool, include_usage: bool):
    """Server-sent events: one chunk per piece of text, a last one per choice with finish_reason,
    then the usage (if asked for) and [DONE]."""
    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

    try:
        if chat:
            for index in range(len(run.jobs)):
                yield _sse(chunk(index, None, None, role=True))
        remaining = len(run.jobs)
        while remaining:
            kind, index, value = await run.events.get()
            if kind == "text":
                yield _sse(chunk(index, value, None))
                continue
            if value is not None:
                yield _sse({"error": {"message": f"generation failed: {value}", "type": "server_error",
                                      "param": None, "code": None}})
                return
            remaining -= 1
            yield _sse(chunk(index, None, _finish_reason(run.jobs[index].request)))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": run.usage()})
        yield _sse("[DONE]")
    finally:
        run.cancel()


async def answer(run: Run, served: Served, body, chat: bool):
    from fastapi.responses import StreamingResponse

    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
            "created": int(time.time()), "model": served.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {**head, "object": f"{kind}.chunk" if chat else kind}
        return StreamingResponse(stream_events(run, head, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    await run.wait()
    choices = []
    for index, job in enumerate(run.jobs):
        choice = {"index": index, "finish_reason": _finish_reason(job.request)}
        if chat:
            choice["message"] = {"role": "assistant", "content": job.request.text}
        else:
            choice.update(text=job.request.text, logprobs=None)
        choices.append(choice)
    return {**head, "choices": choices, "usage": run.usage()}


# ---- the application -------------------------------------------------------------------------

def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` is refused with 413, by its declared
    Content-Length before a byte is read, or (chunked uploads) as soon as the count passes the cap."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            from fastapi.responses import JSONResponse

            response = JSONResponse(error_body(413, self._message()), status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                from starlette.exceptions import HTTPException

                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than this server accepts ({self.max_bytes} bytes)"


def build_app(state: ServerState, on_stop=None):
    """The FastAPI application; `on_stop` runs when the server shuts down (Ctrl-C, SIGTERM)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = _request_models()
    @asynccontextmanager
    async def lifespan(_):
        yield
        if on_stop is not None:
            on_stop()

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes)

    def error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(_, err: ApiError):
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return error(err.status, err.message, err.param, err.code, headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return error(400, f"{where}: {first['msg']}", where)

    @app.exception_handler(HTTPException)
    async def on_http(_, err: HTTPException):
        return error(err.status_code, str(err.detail))

    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next):
        if state.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return error(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                             None, "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not state.scheduler.alive:
            return error(503, "the decoding thread has stopped")
        return {"status": "ok"}

    def card(served: Served) -> dict:
        return {"id": served.name, "object": "model", "created": state.started, "owned_by": "tunesmith"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(s) for s in state.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return card(state.lookup(name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        served = state.lookup(body.model)
        check_fields(body, chat=True, prompts=1, limits=state.limits)
        messages = chat_messages(body.messages)
        ids = await asyncio.to_thread(chat_prompt_ids, served, messages)  # templating and tokenising off the loop
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = sampling_for(body, requested, [len(ids)], served, state.limits, "messages")
        return await answer(Run(state, served, [ids], sampling, body.n, body.stream), served, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = state.lookup(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt is an empty list", "prompt")
        for text in texts:
            unicode_text(text, "prompt")
        check_fields(body, chat=False, prompts=len(texts), limits=state.limits)
        encode = served.loaded.encoder.encode_prompt
        prompts = await asyncio.to_thread(lambda: [encode(text) for text in texts])
        sampling = sampling_for(body, body.max_tokens, [len(p) for p in prompts], served, state.limits, "prompt")
        return await answer(Run(state, served, prompts, sampling, body.n, body.stream), served, body, chat=False)

    return app


def chat_prompt_ids(served: Served, messages: list[dict]) -> list[int]:
    try:
        prompt = conversation_prompt(served.loaded, messages)
    except TunesmithError as err:
        raise ApiError(400, str(err), "messages") from None
    except Exception as err:  # noqa: BLE001 — a model's own chat template may refuse a conversation (jinja)
        raise ApiError(400, f"the model's chat template rejected these messages: {err}", "messages") from None
    return served.loaded.encoder.encode_prompt(prompt)


# ---- the command -----------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load so that a busy port fails at once."""
    if not 0 <= port <= 65535:
        raise TunesmithError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise TunesmithError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def limits_from(args: argparse.Namespace, models: dict[str, Served]) -> Limits:
    contexts = [s.context_length for s in models.values() if s.context_length]
    max_prompt = args.max_prompt_tokens or (min(contexts) - 1 if contexts else 2048)
    if min(args.max_tokens, args.default_max_tokens, max_prompt, args.max_batch_size, args.max_queue,
           args.prefill_tokens, args.max_body_bytes) < 1:
        raise TunesmithError("--max-tokens, --default-max-tokens, --max-prompt-tokens, --max-batch-size, "
                             "--max-queue, --prefill-tokens and --max-body-bytes must be at least 1")
    return Limits(max_prompt, args.max_tokens, min(args.default_max_tokens, args.max_tokens),
                  max_body_bytes=args.max_body_bytes)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--engine", default="builtin", choices=["builtin", "vllm"],
                        help="builtin: this process (CPU or GPU, continuous batching); vllm: exec vLLM's "
                             "OpenAI-compatible server with the same models (CUDA GPUs; args after -- go to vLLM)")
    parser.add_argument("--model", help="base model (alias, HF dir, .gguf); default: the first run's base")
    parser.add_argument("--adapter", "--run", dest="adapters", action="append", default=[], metavar="[NAME=]RUN",
                        help="a fine-tuned run (or checkpoint folder, or merged model dir) to serve as NAME; "
                             "repeat for several")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV})")
    parser.add_argument("--template", default="auto", help="template of the base model (auto, chat, alpaca, qa)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together, at most")
    parser.add_argument("--prefill-tokens", type=int, default=256,
                        help="prompt tokens taken in per decode step, at most: a long prompt is read in chunks "
                             "while the running answers keep coming")
    parser.add_argument("--prompt-cache-mb", type=int, default=PROMPT_CACHE_BYTES >> 20,
                        help="memory per served base model for the keys and values of finished requests, so "
                             "that a prompt beginning the same way (a chat's next turn, the same system text) is "
                             "not read again; 0: off")
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                        help="larger request bodies are refused (413)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="--engine vllm: GPUs that split the model (vLLM's option of that name)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted (default: the model's context - 1)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the maths (default: torch's choice, one per core); on a CPU "
                             "shared with other work, fewer threads avoid waiting on busy cores")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (info logs every request)")
    return parser


def arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and what follows `--` (passed to vLLM as it is)."""
    split = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = parser().parse_args(argv[:split]), argv[split + 1:]
    if passthrough and args.engine != "vllm":
        raise TunesmithError(f"arguments after -- ({' '.join(passthrough)}) are for --engine vllm only")
    return args, passthrough


def main(argv: list[str]) -> int:
    args, passthrough = arguments(argv)
    if args.engine == "vllm":
        from tunesmith.infer import vllm_server

        return vllm_server.main(args, passthrough)
    try:
        import uvicorn
    except ImportError:
        raise TunesmithError("tunesmith serve needs fastapi and uvicorn: pip install 'tunesmith[serve]'") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        say(f"Warning: listening on {args.host} without an API key: anyone who reaches this port can use the "
            f"models (set --api-key or ${API_KEY_ENV})")
    if args.threads is not None and args.threads < 1:
        raise TunesmithError(f"--threads {args.threads} must be at least 1")
    if args.prompt_cache_mb < 0:
        raise TunesmithError(f"--prompt-cache-mb {args.prompt_cache_mb} must be 0 (off) or more")
    from tunesmith.device import pick_device, use_threads

    use_threads(args.threads, pick_device(args.device))
    sock = bind(args.host, args.port)
    models = load_models(args.model, [parse_adapter(a) for a in args.adapters], args.template, args.device,
                         args.precision)
    limits = limits_from(args, models)
    scheduler = Scheduler(args.max_batch_size, args.max_queue, args.prefill_tokens, args.prompt_cache_mb << 20).start()
    state = ServerState(models, scheduler, limits, args.api_key or None, int(time.time()))
    sock.listen(2048)  # from here on connections wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    say(f"Serving {', '.join(models)} on http://{host}:{port}/v1 (limits: prompt {limits.max_prompt_tokens} "
        f"tokens, max_tokens {limits.max_tokens}, batch {args.max_batch_size}, queue {args.max_queue}"
        f"{', API key required' if state.api_key else ''}); Ctrl-C stops")
    def stop() -> None:  # before uvicorn re-raises the signal that stopped it
        scheduler.stop()
        hits, reused = scheduler.prompt_cache_use
        say(f"Stopped (at most {scheduler.largest_batch} requests were decoded together; {hits} prompts began "
            f"with cached tokens, {reused} tokens not read again)")

    app = build_app(state, on_stop=stop)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
    return 0
