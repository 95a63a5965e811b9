"""`tunesmith generate`: answer prompts with a base model, an adapter run, or a full checkpoint,
through the same template the run was trained with, returning only the response."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith import config as config_module
from tunesmith.data.formats import Example
from tunesmith.data.templates import Encoder, Template, choose, prompt_text
from tunesmith.device import pick_device, pick_dtype
from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import Request, Sampling, decode
from tunesmith.log import say
from tunesmith.model.load import load_model, load_tokenizer, resolve
from tunesmith.train import checkpoint

# Prompt tokens read per step when nobody waits for a first token: a whole batch of prompts at once
OFFLINE_PREFILL_TOKENS = 4096


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    template: Template
    label: str  # "base" or the checkpoint folder, for tables and messages

    @property
    def encoder(self) -> Encoder:
        return Encoder(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_base(model_spec: str, template_spec: str = "auto", system_prompt: str | None = None,
              device: str = "auto", precision: str = "auto", for_saving: bool = False) -> Loaded:
    """The model to generate with (`for_saving`: in the layout it is saved in, see decode_layout)."""
    location = resolve(model_spec)
    tokenizer = load_tokenizer(location, quiet=True)
    target = pick_device(device)
    model = load_model(location, dtype=pick_dtype(precision, target), device=str(target))
    if template_spec == "auto":  # a merged model keeps the template its run was trained with
        template_spec = merged_template(location) or template_spec
    model = model if for_saving else decode_layout(model)
    return Loaded(model.eval(), tokenizer, choose(template_spec, tokenizer, system_prompt), "base")


def decode_layout(model: torch.nn.Module) -> torch.nn.Module:
    """On a CPU, every linear layer's weight stored column-major: the same values, but a decode
    step multiplies a few rows by each weight, and MKL does that 1.2-1.6x faster from this layout
    (8 to 32 rows; from a few hundred rows on it makes no difference; bench/RESULTS.md, Serving).
    Not for a model that will be saved: safetensors writes contiguous tensors only."""
    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and weight.dtype.is_floating_point \
                and weight.dim() == 2 and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()
    return model


def merged_template(location: Path | str) -> str | None:
    """data.template of the run a `tunesmith merge` directory came from (None: not a merged model)."""
    import json

    info = Path(str(location)) / "merge_info.json"
    return json.loads(info.read_text()).get("template") if info.is_file() else None


def load_run(run: str | Path, device: str = "auto", precision: str = "auto", for_saving: bool = False) -> Loaded:
    """A run directory or checkpoint folder; LoRA/DoRA/QLoRA adapters are merged for fast generation
    (`for_saving`: the weights in the layout they are saved in, see decode_layout)."""
    folder = checkpoint.pick(Path(run))
    run_config = config_module.load(folder / "config.yaml")
    tokenizer = load_tokenizer(folder, quiet=True)
    target = pick_device(device)
    dtype = pick_dtype(precision, target)
    if checkpoint.is_adapter(folder):  # merged (QLoRA into its dequantized 4-bit base); prompt adapters wrapped
        from tunesmith.merge import load_tuned

        model = load_tuned(folder, run_config, str(target)).to(dtype)
    else:
        model = load_model(folder, dtype=dtype, device=str(target))
    template = choose(run_config.data.template, tokenizer, run_config.data.system_prompt)
    model = model if for_saving else decode_layout(model)
    return Loaded(model.eval(), tokenizer, template, f"tuned ({folder.name})")


def stop_token_ids(loaded: Loaded) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generate(loaded: Loaded, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, progress=None) -> list[str]:
    """Answers to already-templated prompts, in input order (greedy when temperature is 0)."""
    return generate_with_limits(loaded, prompts, max_new_tokens, batch_size, temperature, top_p, progress)[0]


def generate_with_limits(loaded: Loaded, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
                         temperature: float = 0.0, top_p: float = 1.0, progress=None
                         ) -> tuple[list[str], list[bool]]:
    """The answers, and for each whether it ran into max_new_tokens without a stop token (cut off)."""
    requests = run_requests(loaded, [loaded.encoder.encode_prompt(p) for p in prompts],
                            Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
                            batch_size, progress)
    return [r.text.strip() for r in requests], [r.finish_reason == "length" for r in requests]


def run_requests(loaded: Loaded, prompt_ids: list[list[int]], sampling: Sampling, batch_size: int = 16,
                 progress=None, scored: list[tuple[list[int], list[bool]] | None] | None = None) -> list[Request]:
    """Every prompt decoded to the end, the finished Requests in input order. Prompts go through the
    continuous-batching engine shortest first (little padding), at most `batch_size` at a time, the
    next one joining as soon as an answer ends. `scored[i]` (ids, counted) are tokens that follow
    prompt i whose log-likelihood its prefill reads (Request.score_logprob); the answer is not affected."""
    problems = sampling.problems()
    if problems:
        raise TunesmithError("; ".join(problems))
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    requests: list[Request] = [None] * len(prompt_ids)  # type: ignore[list-item]
    for index in order:
        ids, counted = (scored[index] if scored and scored[index] else ([], []))
        requests[index] = Request(prompt_ids[index], sampling, score_ids=list(ids), score_counted=list(counted))
    decode(loaded.model, loaded.tokenizer, [requests[i] for i in order], stop_token_ids(loaded),
           loaded.tokenizer.pad_token_id, batch_size=batch_size,
           on_finished=(lambda _: progress(1)) if progress is not None else None,
           prefill_tokens=OFFLINE_PREFILL_TOKENS)
    return requests


def template_prompt(loaded: Loaded, user_text: str) -> str:
    example = Example([{"role": "user", "content": user_text}, {"role": "assistant", "content": ""}],
                      instruction=user_text)
    return prompt_text(loaded.template, example, loaded.tokenizer)


def conversation_prompt(loaded: Loaded, messages: list[dict]) -> str:
    """The prompt for the next assistant turn of `messages` (system/user/assistant dicts, ending
    with a user turn). A chat template sees the whole history; the single-turn templates (alpaca,
    qa, custom) see the last user message only, as they did in training. A leading system message
    takes the place of the run's data.system_prompt."""
    if loaded.template.name != "chat":
        return template_prompt(loaded, messages[-1]["content"])
    example = Example([*messages, {"role": "assistant", "content": ""}], instruction=messages[-1]["content"])
    return prompt_text(loaded.template, example, loaded.tokenizer)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith generate",
                                     description="Answer a prompt with a base model or a fine-tuned run.")
    parser.add_argument("--model", help="base model (alias, HF dir, .gguf); default: the run's base")
    parser.add_argument("--adapter", "--run", dest="run", help="run directory or checkpoint folder")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--template", default="auto", help="template for a base model (auto, chat, alpaca, qa)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the maths (default: one per core); fewer on a CPU shared with other work")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    from tunesmith.device import pick_device, use_threads

    use_threads(args.threads, pick_device(args.device))
    if not args.model and not args.run:
        raise TunesmithError("give --model, --adapter RUN, or both")
    if args.run:
        loaded = load_run(args.run, args.device, args.precision)
        if args.model:
            say(f"Using the run's own base model; --model {args.model} is ignored")
    else:
        loaded = load_base(args.model, args.template, None, args.device, args.precision)
    prompt = template_prompt(loaded, args.prompt)
    [answer] = generate(loaded, [prompt], args.max_new_tokens, 1, args.temperature, args.top_p)
    print(answer)
    return 0
