"""`tunesmith chat`: talk to a base model, a fine-tuned run or a merged model in the terminal.

Every turn goes through the template the run was trained with; with a chat template the model
sees the whole conversation so far, and reads only what is new each turn (the turns before are
kept in its prompt cache). Answers appear token by token.

    /reset   forget the conversation (the system message stays)
    /exit    quit (so does Ctrl-D)
    Ctrl-C   stops the answer being written; what was written stays in the history
"""

from __future__ import annotations

import argparse
import signal
import sys

from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import Engine, Request, Sampling, context_length, decode
from tunesmith.infer.generate import Loaded, conversation_prompt, load_base, load_run, stop_token_ids
from tunesmith.log import say

PROMPT = "you> "


def sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (deterministic)")
    parser.add_argument("--top-p", type=float, default=0.9, help="sample from the top tokens holding this much probability")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: no limit)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="> 1 discourages repeating tokens")
    parser.add_argument("--seed", type=int, default=None, help="fixes the sampled answers")


def sampling_from(args: argparse.Namespace) -> Sampling:
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    problems = sampling.problems()
    if problems:
        raise TunesmithError("; ".join(f"--{p.replace('_', '-')}" for p in problems))
    return sampling


def load(args: argparse.Namespace) -> Loaded:
    if not args.model and not args.run:
        raise TunesmithError("give --model (base or merged model), --adapter RUN, or both")
    if args.run:
        if args.model:
            say(f"Using the run's own base model; --model {args.model} is ignored")
        return load_run(args.run, args.device, args.precision)
    return load_base(args.model, args.template, None, args.device, args.precision)


class Conversation:
    """The history of one chat, turned into prompt tokens that fit the model's context."""

    def __init__(self, loaded: Loaded, system_prompt: str | None, max_new_tokens: int):
        self.loaded = loaded
        self.start = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.messages = list(self.start)
        self.budget = (context_length(loaded.model) or 1 << 30) - max_new_tokens  # tokens left for the prompt
        self.dropped = 0  # turns left out so far because the history no longer fit

    def reset(self) -> None:
        self.messages = list(self.start)

    def prompt_ids(self, user_text: str) -> list[int] | None:
        """Add a user turn; the prompt's token ids, dropping the oldest turns if the history no
        longer fits. None (and nothing changes) when the message alone is too long."""
        message = {"role": "user", "content": user_text}
        if len(self._encode([*self.start, message])) > self.budget:
            return None
        self.messages.append(message)
        while len(ids := self._encode(self.messages)) > self.budget:
            first = len(self.start)
            del self.messages[first: first + 2]  # the oldest question and its answer
            self.dropped += 1
            say("(the oldest turn was dropped: the conversation no longer fits the model's context)")
        return ids

    def _encode(self, messages: list[dict]) -> list[int]:
        return self.loaded.encoder.encode_prompt(conversation_prompt(self.loaded, messages))

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def reply(loaded: Loaded, prompt_ids: list[int], sampling: Sampling, out, engine: Engine) -> tuple[str, bool]:
    """Stream one answer to `out`; Ctrl-C ends it early. Returns the text written, and whether the
    engine is still fit for the next turn (not when Ctrl-C stopped it half-way through a step).
    The engine is the conversation's own: its prompt cache holds the turns so far, so each turn
    reads only the new message (prompt_cache.py)."""
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    request = Request(prompt_ids, sampling, on_text=write)
    intact = True
    try:
        decode(loaded.model, loaded.tokenizer, [request], stop_token_ids(loaded), loaded.tokenizer.pad_token_id,
               engine=engine)
    except KeyboardInterrupt:
        out.write(" [stopped]")
        intact = False
    out.write("\n")
    out.flush()
    return request.text, intact


def repl(loaded: Loaded, sampling: Sampling, system_prompt: str | None, out=sys.stdout) -> int:
    # Ctrl-C must stop an answer even when this process was started with SIGINT ignored (as a shell
    # starts `cmd &` without job control, and its children inherit): then Python installs no handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    conversation = Conversation(loaded, system_prompt, sampling.max_new_tokens)
    engine = None
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: nothing to stop; say how to leave
            out.write("\n")
            say("(Ctrl-C stops an answer; /exit quits)")
            continue
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            conversation.reset()
            say("(conversation cleared)")
            continue
        if command.startswith("/"):
            say(f"unknown command {command.split()[0]}: /reset clears the conversation, /exit quits")
            continue
        if not command:
            continue
        prompt_ids = conversation.prompt_ids(line)
        if prompt_ids is None:
            say(f"(that message is too long for the model's context of {context_length(loaded.model)} tokens "
                f"with --max-new-tokens {sampling.max_new_tokens})")
            continue
        engine = engine or Engine(loaded.model, loaded.tokenizer.pad_token_id)
        text, intact = reply(loaded, prompt_ids, sampling, out, engine)
        conversation.answered(text)
        engine = engine if intact else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith chat", description=__doc__.split("\n\n")[0],
                                     epilog="/reset forgets the conversation, /exit quits, Ctrl-C stops an answer.")
    parser.add_argument("--model", help="base or merged model (alias, HF dir, .gguf); default: the run's base")
    parser.add_argument("--adapter", "--run", dest="run", help="run directory or checkpoint folder")
    parser.add_argument("--template", default="auto", help="template for a base model (auto, chat, alpaca, qa)")
    parser.add_argument("--system", help="system message (default: the run's data.system_prompt)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    sampling_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the maths (default: one per core); fewer on a CPU shared with other work")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    from tunesmith.device import pick_device, use_threads

    use_threads(args.threads, pick_device(getattr(args, "device", "auto")))
    sampling = sampling_from(args)
    loaded = load(args)
    system_prompt = args.system if args.system is not None else loaded.template.system_prompt
    say(f"Chatting with {args.run or args.model} ({loaded.label}, template {loaded.template.describe}). "
        "/reset clears the conversation, /exit quits, Ctrl-C stops an answer.")
    if loaded.template.name != "chat":
        say(f"Note: the {loaded.template.describe} template is single-turn: each message is answered on its own.")
    return repl(loaded, sampling, system_prompt, sys.stdout)
