"""Templates turn an Example into text pieces, each marked trained-on or not, and then tokens.

Pieces are tokenized one by one and concatenated. The prompt is therefore tokenized exactly as
`generate` tokenizes it at inference time, so training and serving see the same token ids.

    chat     the model's own chat template; every assistant turn is supervised
    alpaca   "### Instruction: / ### Input: / ### Response:"
    qa       "### Question:\n{prompt}\n### Answer:\n"
    custom   any string containing {prompt} (and optionally {input}, {system})
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from tunesmith.data.formats import Example
from tunesmith.errors import ConfigError, DataError

ALPACA_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n\n")
ALPACA_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n")
QA = "### Question:\n{prompt}\n### Answer:\n"
NAMED = ("chat", "alpaca", "qa")


@dataclass(frozen=True)
class Template:
    name: str  # chat | alpaca | qa | custom
    text: str = ""  # the format string of a custom template
    system_prompt: str | None = None
    last_turn_only: bool = False  # data.assistant_turns: last — earlier answers are context only

    @property
    def spec(self) -> str:
        """The value of data.template that selects exactly this template."""
        return self.text if self.name == "custom" else self.name

    @property
    def describe(self) -> str:
        return f"custom ({self.text!r})" if self.name == "custom" else self.name


def choose(spec: str, tokenizer, system_prompt: str | None = None) -> Template:
    """The template for `data.template`; auto is the model's own chat template when it has one."""
    from tunesmith.model.load import has_own_chat_template

    if spec == "auto":
        spec = "chat" if has_own_chat_template(tokenizer) else "alpaca"
    if spec in NAMED:
        return Template(spec, system_prompt=system_prompt)
    fields = placeholders(spec)
    if "prompt" not in fields:
        raise ConfigError(f"data.template={spec!r} is not one of {list(NAMED)} and, as a custom "
                          "template, it lacks the {prompt} placeholder")
    unknown = sorted(fields - {"prompt", "input", "system"})  # also {input.x}, {system[0]}: no attribute access
    if unknown:
        raise ConfigError(f"data.template={spec!r}: only {{prompt}}, {{input}} and {{system}} "
                          f"may appear in braces, not {{{unknown[0]}}}")
    try:
        spec.format(prompt="", input="", system="")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"data.template={spec!r}: only {{prompt}}, {{input}} and {{system}} "
                          f"may appear in braces ({err})") from None
    return Template("custom", spec, system_prompt)


def placeholders(spec: str) -> set[str]:
    """The fields format() fills in: "{{prompt}}" is literal text, "{prompt.upper}" is not {prompt}."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(spec) if name is not None}
    except ValueError:  # unbalanced braces: format() in choose() says which
        return {"prompt"} if "{prompt}" in spec else set()


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(template: Template, example: Example, tokenizer) -> str:
    """The text a model is given at inference time: everything before the final answer."""
    if template.name == "chat":
        messages = _with_system(example.prompt_messages, template.system_prompt)
        return _chat(tokenizer, messages, add_generation_prompt=True)
    _single_turn_only(template, example)
    if template.name == "alpaca":
        head = ALPACA_HEAD_INPUT if example.input.strip() else ALPACA_HEAD
        body = f"### Instruction:\n{example.instruction}\n\n"
        if example.input.strip():
            body += f"### Input:\n{example.input}\n\n"
        return head + body + "### Response:\n"
    if template.name == "qa":
        return QA.format(prompt=example.prompt_messages[-1]["content"])
    return template.text.format(prompt=example.instruction, input=example.input,
                                system=template.system_prompt or "")


def _single_turn_only(template: Template, example: Example) -> None:
    if sum(m["role"] == "assistant" for m in example.messages) > 1:
        raise DataError(f"{example.where}: a multi-turn conversation needs data.template: chat "
                        f"(the {template.describe} template is single-turn)")


def pieces(template: Template, example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The whole example as (text, supervised) pieces; every response ends with EOS."""
    eos = tokenizer.eos_token
    if template.name != "chat":
        return [(prompt_text(template, example, tokenizer), False), (example.reference + eos, True)]
    messages = _with_system(example.messages, template.system_prompt)
    out: list[tuple[str, bool]] = []
    rendered = ""  # the template's own text consumed so far
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        trained = index == last_answer or not template.last_turn_only
        before = _chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = _chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not through.startswith(before):
            raise DataError(f"{example.where}: this model's chat template renders turns differently "
                            "depending on what follows; use data.template: alpaca or a custom template")
        answer = through[len(before):]
        cut = answer.find(eos)
        if cut >= 0:  # supervise through the end-of-turn token; what follows is formatting
            answer = answer[: cut + len(eos)]
            out += [(before[len(rendered):], False), (answer, trained)]
            rendered = before + answer
        else:  # the template ends turns without EOS: add it, so the model learns to stop
            out += [(before[len(rendered):], False), (answer + eos, trained)]
            rendered = through
    return [(text, supervised) for text, supervised in out if text]


def prompt_of(parts: list[tuple[str, bool]]) -> str:
    """The text before the final answer of `pieces`' output: what prompt_text renders, without
    rendering the template again."""
    return "".join(text for text, _ in parts[:-1])


class Encoder:
    """Tokenizes pieces; adds the tokenizer's own leading tokens (e.g. BOS) once, where it would."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        probe = "hello"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        self.lead = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _lead_for(self, first_text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        if self.lead and bos and first_text.startswith(bos):
            return []  # the template already wrote it
        return list(self.lead)

    def encode(self, parts: list[tuple[str, bool]], mask_prompt: bool = True) -> tuple[list[int], list[bool]]:
        return self.encode_many([parts], mask_prompt)[0]

    def encode_many(self, examples: list[list[tuple[str, bool]]], mask_prompt: bool = True
                    ) -> list[tuple[list[int], list[bool]]]:
        """`encode` of each example's pieces; every piece of them in one call to the tokenizer (its
        Rust side then does the work, not a Python call per piece)."""
        texts = [text for parts in examples for text, _ in parts]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out = []
        for parts in examples:
            ids = self._lead_for(parts[0][0])
            supervised = [not mask_prompt] * len(ids)
            for _, is_response in parts:
                piece = next(encoded)
                ids += piece
                supervised += [is_response or not mask_prompt] * len(piece)
            out.append((ids, supervised))
        return out

    def encode_prompt(self, text: str) -> list[int]:
        return self._lead_for(text) + self._ids(text)
