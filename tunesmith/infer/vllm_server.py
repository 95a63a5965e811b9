"""`tunesmith serve --engine vllm`: the same models, names, templates and API key as the built-in
server, served by vLLM's OpenAI-compatible server on CUDA GPUs, so that clients do not change.

    tunesmith serve --engine vllm --model smollm2-135m --adapter dates=out/dates --api-key KEY \\
        --tensor-parallel-size 2 -- --gpu-memory-utilization 0.85

becomes (and execs)

    vllm serve BASE_DIR --served-model-name smollm2-135m --chat-template TEMPLATE.jinja \\
        --enable-lora --max-loras 1 --max-lora-rank 16 --lora-modules dates=out/dates/best \\
        --host 127.0.0.1 --port 8000 --tensor-parallel-size 2 --generation-config vllm \\
        --gpu-memory-utilization 0.85                     (the API key goes in $VLLM_API_KEY)

The runs must be LoRA (or QLoRA) adapters of the served base: vLLM applies each request's own
adapter (multi-LoRA). vLLM takes one chat template for the whole server, so the runs must share
their template (each is checked). Everything after `--` is passed to vLLM as it is.
vLLM is an optional extra (pip install 'tunesmith[vllm]') that only runs on GPU machines.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.templates import choose
from tunesmith.errors import TunesmithError
from tunesmith.infer.generate import merged_template
from tunesmith.infer.registry import model_name, parse_adapter, read_run_config
from tunesmith.log import say
from tunesmith.model.load import cache_root, load_tokenizer, resolve
from tunesmith.train import checkpoint

VLLM_METHODS = ("lora", "qlora")  # runs vLLM can serve as LoRA adapters of the base
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


@dataclass(frozen=True)
class Lora:
    name: str  # the served name, as the built-in server gives it
    folder: Path  # the adapter checkpoint (PEFT format)
    rank: int
    chat_template: str  # the run's template, as Jinja


@dataclass(frozen=True)
class Plan:
    command: list[str]  # argv of `vllm serve ...`
    env: dict[str, str]  # added to the environment (the API key: kept off the command line that `ps` shows)
    chat_template: str  # written to `template_path` before vLLM starts
    template_path: Path


def ensure_installed() -> str:
    """The `vllm` program; a one-line error when vLLM is not installed."""
    program = shutil.which("vllm")
    if importlib.util.find_spec("vllm") is None or program is None:
        raise TunesmithError("--engine vllm needs vLLM, which is not installed here; on a machine with a CUDA "
                             "GPU: pip install 'tunesmith[vllm]' (or use --engine builtin)")
    return program


def plan(args: argparse.Namespace, passthrough: list[str], program: str = "vllm") -> Plan:
    """What to run: the base, every run as a LoRA module, one chat template, the server options."""
    if args.port == 0:
        raise TunesmithError("--engine vllm needs a fixed --port (vLLM cannot pick a free one)")
    adapters = [parse_adapter(text) for text in args.adapters]
    configs = [read_run_config(folder) for _, folder in adapters]
    base_spec = args.model or (configs[0].model if configs and configs[0] is not None else None)
    if base_spec is None:
        raise TunesmithError("give --model BASE, or --adapter RUN (whose base is then served too)")
    location = resolve(base_spec)
    base_template = base_chat_template(location, args.template)
    loras = [lora_of(name, folder, config, location) for (name, folder), config in zip(adapters, configs)]
    template = one_template(model_name(base_spec), base_template, loras)
    path = cache_root() / "vllm" / f"chat-template-{hashlib.sha256(template.encode()).hexdigest()[:16]}.jinja"
    command = command_line(program, str(location), model_name(base_spec), loras, path, args, passthrough)
    return Plan(command, {"VLLM_API_KEY": args.api_key} if args.api_key else {}, template, path)


def command_line(program: str, base: str, base_name: str, loras: list[Lora], template_path: Path,
                 args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    command = [program, "serve", base, "--served-model-name", base_name, "--chat-template", str(template_path),
               "--host", args.host, "--port", str(args.port), "--tensor-parallel-size", str(args.tensor_parallel_size),
               "--generation-config", "vllm"]  # vLLM's defaults (temperature 1, top_p 1), as the built-in server
    if loras:
        rank = next((r for r in VLLM_LORA_RANKS if r >= max(lora.rank for lora in loras)), VLLM_LORA_RANKS[-1])
        command += ["--enable-lora", "--max-loras", str(len(loras)), "--max-lora-rank", str(rank),
                    "--lora-modules", *[f"{lora.name}={lora.folder}" for lora in loras]]
    if args.precision != "auto":
        command += ["--dtype", {"bf16": "bfloat16", "fp32": "float32"}[args.precision]]
    return command + passthrough


def base_chat_template(location, template_spec: str) -> str:
    from tunesmith.model.portable_template import jinja_template

    tokenizer = load_tokenizer(location, quiet=True)
    if template_spec == "auto":  # a merged model keeps its run's template, as in the built-in server
        template_spec = merged_template(location) or template_spec
    return jinja_template(choose(template_spec, tokenizer), tokenizer)


def lora_of(name: str, folder: Path, run_config, base_location) -> Lora:
    """A run as a vLLM LoRA module, or a plain-words refusal."""
    if run_config is None:
        raise TunesmithError(f"--adapter {name}: {folder} is a whole model, not a run; vLLM serves one base per "
                             f"server: start another one with --model {folder}")
    adapter = checkpoint.pick(folder)
    if run_config.weights not in VLLM_METHODS or not checkpoint.is_adapter(adapter):
        raise TunesmithError(f"--adapter {name}: vLLM serves LoRA adapters, and this is a {run_config.method} run; "
                             f"merge it (tunesmith merge {folder}) and serve the merged model with its own --model")
    run_base = resolve(run_config.model)
    if Path(str(run_base)).resolve() != Path(str(base_location)).resolve():
        raise TunesmithError(f"--adapter {name}: trained on {run_config.model}, not on the served base")
    if run_config.weights == "qlora":
        say(f"Note: {name} is a QLoRA run; vLLM applies it to the unquantized base")
    from tunesmith.model.portable_template import jinja_template

    tokenizer = load_tokenizer(adapter, quiet=True)
    template = choose(run_config.data.template, tokenizer, run_config.data.system_prompt)
    rank = int(json.loads((adapter / "adapter_config.json").read_text())["r"])
    return Lora(name, adapter, rank, jinja_template(template, tokenizer))


def one_template(base_name: str, base_template: str, loras: list[Lora]) -> str:
    """vLLM has one chat template per server: the runs must agree on it (with the base when alone)."""
    templates = {lora.name: lora.chat_template for lora in loras} or {base_name: base_template}
    first_name, first = next(iter(templates.items()))
    for name, template in templates.items():
        if template != first:
            raise TunesmithError(f"vLLM applies one chat template to all the models of a server, and the runs "
                                 f"{first_name} and {name} were trained with different ones: serve them from two "
                                 "servers (two ports)")
    if loras and base_template != first:
        say(f"Note: vLLM answers the base {base_name} with the runs' template too")
    return first


def write_template(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def main(args: argparse.Namespace, passthrough: list[str]) -> int:
    program = ensure_installed()
    launch = plan(args, passthrough, program)
    write_template(launch.template_path, launch.chat_template)
    shown = " ".join(launch.command)
    say(f"Starting vLLM{' (API key in $VLLM_API_KEY)' if launch.env else ''}: {shown}")
    os.execvpe(program, launch.command, {**os.environ, **launch.env})
    return 0  # not reached: exec replaces this process
