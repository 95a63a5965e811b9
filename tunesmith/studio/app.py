"""The studio's HTTP side: the page, and a JSON API over run directories, jobs and models. Every
error is a JSON message with a 4xx status (or one line and a 500), never a traceback."""

from __future__ import annotations

import hmac
import json
import math
import re
import shlex
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.infer.request import Sampling
from tunesmith.studio import chat, compare, forms, jobs, runs

STATIC = Path(__file__).parent / "static"
UPLOAD_LIMIT = 512 * 2**20
SHIP_VERBS = {"evaluate": lambda run, _: [run], "report": lambda run, _: [run], "merge": lambda run, _: [run],
              "export": lambda run, kind: [run, "--format", "gguf", "--type", kind]}
EXPORT_TYPES = ("f16", "q8_0", "q4_k_m")
SAFE_FILE = re.compile(r"^[A-Za-z0-9_.-]+$")


class FiniteJSON(JSONResponse):
    """JSON with NaN and infinity (a diverged run's losses) as null, which every browser can parse."""

    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


class Problem(Exception):
    def __init__(self, status: int, message: str | list[str]):
        super().__init__(message)
        self.status, self.problems = status, [message] if isinstance(message, str) else message


class Studio:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.here = Path.cwd()
        self.jobs = jobs.Jobs(self.root, self.here)
        self.models = chat.Models()
        self.doctor_plots = self.root / ".studio" / "doctor"

    def folder(self, name: str) -> Path:
        try:
            return runs.run_dir(self.root, name)
        except runs.RunNotFound as err:
            raise Problem(404, str(err)) from None

    def busy(self, name: str) -> str | None:
        job = self.jobs.latest(name)
        if job is not None and jobs.alive(job):
            return f"{name} is busy: {job.command} is still running"
        return "the run is training" if (self.root / name).is_dir() and runs.locks.training_pid(self.root / name) \
            else None


def create_app(root: Path, api_key: str | None = None) -> FastAPI:
    studio = Studio(root)
    app = FastAPI(title="tunesmith studio", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=FiniteJSON)
    app.state.studio = studio
    if api_key:
        app.add_middleware(KeyCheck, key=api_key)

    @app.exception_handler(Problem)
    async def problem(_request, err: Problem):
        return JSONResponse({"problems": err.problems}, status_code=err.status)

    @app.exception_handler(Exception)
    async def unexpected(_request, err: Exception):
        return JSONResponse({"problems": [f"internal error: {type(err).__name__}: {err}"]}, status_code=500)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    def static(name: str):
        if not SAFE_FILE.match(name) or not (STATIC / name).is_file():
            raise Problem(404, f"no file {name}")
        return FileResponse(STATIC / name)

    add_run_routes(app, studio)
    add_new_run_routes(app, studio)
    add_compare_chat_routes(app, studio)
    return app


def add_run_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/runs")
    def list_runs():
        return {"root": str(studio.root),
                "runs": [runs.summary(studio.root, name, studio.jobs) for name in runs.names(studio.root, studio.jobs)]}

    @app.get("/api/runs/{name}")
    def run_detail(name: str):
        if name.startswith(".") or "/" in name:
            raise Problem(404, f"{name!r} is not a run")
        if not runs.folderless(studio.root, name, studio.jobs):
            studio.folder(name)  # no folder and no job starting it: the 404 with its reason
        return runs.detail(studio.root, name, studio.jobs)

    @app.get("/api/runs/{name}/plots/{file}")
    def run_plot(name: str, file: str):
        path = studio.folder(name) / "plots" / file
        if not SAFE_FILE.match(file) or not path.is_file():
            raise Problem(404, f"{name} has no plot {file}")
        return FileResponse(path)

    @app.get("/api/runs/{name}/report")
    def run_report(name: str):
        path = studio.folder(name) / "report.html"
        if not path.is_file():
            raise Problem(404, f"{name} has no report.html yet: press Report")
        return FileResponse(path)

    @app.post("/api/runs/{name}/stop")
    def stop(name: str):
        folder = studio.folder(name)
        if not jobs.stop(studio.jobs.latest(name, "finetune"), folder):
            raise Problem(409, f"{name} is not training")
        return {"stopping": name, "note": "a checkpoint is saved at the end of the current step"}

    @app.post("/api/runs/{name}/resume")
    def resume(name: str):
        folder = studio.folder(name)
        if (reason := studio.busy(name)) is not None:
            raise Problem(409, reason)
        job = studio.jobs.start("finetune", name, [str(folder), "--resume"])
        return {"command": job.command}

    @app.post("/api/runs/{name}/{verb}")
    def ship(name: str, verb: str, type: str = "q8_0"):  # noqa: A002 — export's own flag name
        folder = studio.folder(name)
        if verb not in SHIP_VERBS:
            raise Problem(404, f"unknown action {verb!r}; actions: {', '.join(SHIP_VERBS)}")
        if type not in EXPORT_TYPES:
            raise Problem(400, f"type {type!r}: one of {', '.join(EXPORT_TYPES)}")
        if (reason := studio.busy(name)) is not None:
            raise Problem(409, reason)
        job = studio.jobs.start(verb, name, SHIP_VERBS[verb](str(folder), type))
        return {"command": job.command}


def add_new_run_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/fields")
    def fields():
        return {"fields": forms.fields()}

    @app.post("/api/check")
    async def check(request: Request):
        name, values = _form(await _body(request))
        try:
            args, config = forms.check(studio.root, name, values, studio.here)
        except ConfigError as err:
            return {"problems": err.problems}
        plot = studio.doctor_plots / f"{name}.png"
        doctor = await run_in_threadpool(forms.doctor, config, plot)
        memory = await run_in_threadpool(forms.memory, config)
        return {"problems": [], "command": "tunesmith finetune " + shlex.join(args), "doctor": doctor,
                "memory": memory}

    @app.post("/api/runs")
    async def start(request: Request):
        name, values = _form(await _body(request))
        try:
            args, _ = forms.check(studio.root, name, values, studio.here)
        except ConfigError as err:
            raise Problem(422, err.problems) from None
        if studio.jobs.latest(name) is not None:
            raise Problem(409, f"run name {name!r} was used before; pick another name")
        job = studio.jobs.start("finetune", name, args)
        return {"name": name, "command": job.command}

    @app.get("/api/doctor/{file}")
    def doctor_plot(file: str):
        path = studio.doctor_plots / file
        if not SAFE_FILE.match(file) or not path.is_file():
            raise Problem(404, f"no doctor plot {file}")
        return FileResponse(path)

    @app.put("/api/upload/{file}")
    async def upload(file: str, request: Request):
        if not SAFE_FILE.match(file) or file.startswith("."):
            raise Problem(400, f"file name {file!r}: use letters, digits, '-', '_' and '.'")
        folder = studio.root / ".studio" / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        tmp, size = folder / f".{file}.part", 0
        with tmp.open("wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > UPLOAD_LIMIT:
                    handle.close()
                    tmp.unlink()
                    raise Problem(413, f"{file} is over {UPLOAD_LIMIT // 2**20} MB; give its path instead")
                handle.write(chunk)
        tmp.replace(folder / file)
        return {"path": str(folder / file), "bytes": size}


async def _body(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise Problem(400, "the request body is not JSON") from None


def _form(body) -> tuple[str, dict[str, str]]:
    if not isinstance(body, dict) or not isinstance(body.get("values", {}), dict):
        raise Problem(400, 'send {"name": RUN_NAME, "values": {"config.key": "value", ...}}')
    return str(body.get("name") or ""), {str(k): v for k, v in body.get("values", {}).items()}


def add_compare_chat_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/compare")
    def compare_runs(request: Request, filter: str = "all"):
        names = request.query_params.getlist("run")
        if len(names) < 2:
            raise Problem(400, "pick two or more runs to compare")
        if filter not in compare.FILTERS:
            raise Problem(400, f"filter {filter!r}: one of {', '.join(compare.FILTERS)}")
        folders = [studio.folder(name) for name in names]
        details = [runs.detail(studio.root, name, studio.jobs) for name in names]
        return {**compare.compare(folders, filter),
                "curves": [d["curves"] for d in details], "diagnoses": [d["diagnosis"] for d in details]}

    @app.post("/api/chat")
    async def chat_stream(request: Request):
        body = await _body(request)
        if not isinstance(body, dict):
            raise Problem(400, 'send {"run": NAME, "side": "base"|"tuned", "prompt": TEXT, "history": [...]}')
        folder = studio.folder(str(body.get("run", "")))
        side, prompt = body.get("side", "tuned"), body.get("prompt")
        if side not in ("base", "tuned"):
            raise Problem(400, f"side {side!r}: base or tuned")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Problem(400, "the prompt is empty")
        if side == "tuned" and not (folder / "final").is_dir() and not runs.checkpoint.step_folders(folder):
            raise Problem(409, f"{folder.name} has no checkpoint yet to chat with")
        sampling, history = _sampling(body), _history(body)
        try:
            answer = await run_in_threadpool(chat.stream, studio.models, folder, side, history, prompt, sampling)
        except (TunesmithError, OSError) as err:
            raise Problem(422, f"cannot load the {side} model of {folder.name}: {err}") from None
        if answer is None:
            raise Problem(400, "the message is too long for the model's context with max_new_tokens "
                               f"{sampling.max_new_tokens}")
        pieces, dropped = answer
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8",
                                 headers={"X-Dropped-Turns": str(dropped)})


MAX_HISTORY = 200  # messages: 100 earlier turns


def _history(body: dict) -> list[dict]:
    """The earlier turns of this side's conversation: user and assistant messages, alternating."""
    history = body.get("history", [])
    whole_turns = isinstance(history, list) and len(history) % 2 == 0 and len(history) <= MAX_HISTORY
    if not whole_turns or any(not isinstance(message, dict) or not isinstance(message.get("content"), str)
                              or message.get("role") != ("user", "assistant")[index % 2]
                              for index, message in enumerate(history)):
        raise Problem(400, 'history: [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}, '
                           f"...]: whole turns, oldest first, at most {MAX_HISTORY} messages")
    return [{"role": message["role"], "content": message["content"]} for message in history]


def _sampling(body: dict) -> Sampling:
    try:
        sampling = Sampling(max_new_tokens=int(body.get("max_new_tokens", 128)),
                            temperature=float(body.get("temperature", 0.0)))
    except (TypeError, ValueError):
        raise Problem(400, "max_new_tokens must be a whole number and temperature a number") from None
    if problems := sampling.problems():
        raise Problem(400, problems)
    return sampling


class KeyCheck(BaseHTTPMiddleware):
    """Anything but loopback needs the key: the Authorization header, or ?token= for links and images."""

    def __init__(self, app, key: str):
        super().__init__(app)
        self.key = key

    async def dispatch(self, request, call_next):
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
            or request.query_params.get("token", "")
        if request.url.path.startswith("/static/") or request.url.path == "/" or \
                hmac.compare_digest(given.encode(), self.key.encode()):
            return await call_next(request)
        return JSONResponse({"problems": ["this studio needs its key: open the link with ?token=KEY"]},
                            status_code=401)
