"""The run's prompt template in the forms other programs read: a Jinja chat template (the GGUF's
`tokenizer.chat_template`, read by llama.cpp, LM Studio and llama-cpp-python) and an Ollama
Modelfile TEMPLATE (Go template syntax).

Both are derived from tunesmith's own rendering (data/templates.py), so they produce exactly the
prompt the model was trained on. A prompt is cut into pieces by rendering it with marker words in
place of the system and user text:

    with a system prompt      system_head + SYSTEM + system_tail + USER + user_tail
    without one               plain_head + USER + plain_tail
    after the answer          ANSWER + answer_tail          (answer_tail ends with the trained EOS)

The model's own chat template (data.template: chat) is kept as it is, with the run's
data.system_prompt put in front when a conversation has no system message, as training did. The
single-turn templates (alpaca, qa, custom) see the last user message only, as `tunesmith chat` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from tunesmith.data.formats import Example
from tunesmith.data.templates import Template, pieces, prompt_text
from tunesmith.errors import TunesmithError

SYSTEM_MARK, USER_MARK, ANSWER_MARK = "TunesmithSystemMark", "TunesmithUserMark", "TunesmithAnswerMark"


class TemplateExportError(TunesmithError):
    """The run's template cannot be written in another program's template language."""


@dataclass(frozen=True)
class Pieces:
    plain_head: str
    plain_tail: str
    answer_tail: str
    system_head: str | None = None  # None: the template has no place for a system prompt
    system_tail: str | None = None
    system_user_tail: str | None = None


def render(template: Template, tokenizer, system: str | None, user: str) -> str:
    """The prompt tunesmith gives the model for one user message (and a system prompt)."""
    example = Example([{"role": "user", "content": user}, {"role": "assistant", "content": ""}], instruction=user)
    return prompt_text(replace(template, system_prompt=system), example, tokenizer)


def _split(text: str, *marks: str) -> list[str]:
    out = []
    for mark in marks:
        if text.count(mark) != 1:
            raise TemplateExportError(f"the {mark!r} marker appears {text.count(mark)} times in the rendered "
                                      "prompt; this template cannot be written for llama.cpp / Ollama")
        head, text = text.split(mark)
        out.append(head)
    return [*out, text]


def derive(template: Template, tokenizer) -> Pieces:
    plain_head, plain_tail = _split(render(template, tokenizer, None, USER_MARK), USER_MARK)
    example = Example([{"role": "user", "content": USER_MARK}, {"role": "assistant", "content": ANSWER_MARK}],
                      instruction=USER_MARK)
    answer = "".join(text for text, supervised in pieces(replace(template, system_prompt=None), example, tokenizer)
                     if supervised)
    answer_tail = _split(answer, ANSWER_MARK)[1]
    try:
        with_system = render(template, tokenizer, SYSTEM_MARK, USER_MARK)
    except Exception:  # noqa: BLE001 - a chat template may refuse the system role outright
        with_system = ""
    if SYSTEM_MARK not in with_system:
        return Pieces(plain_head, plain_tail, answer_tail)
    system_head, system_tail, user_tail = _split(with_system, SYSTEM_MARK, USER_MARK)
    return Pieces(plain_head, plain_tail, answer_tail, system_head, system_tail, user_tail)


def _jinja_text(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}"  # a JSON string is a valid Jinja string literal


def jinja_template(template: Template, tokenizer) -> str:
    """The chat template to store in the GGUF."""
    default = template.system_prompt or ""
    if template.name == "chat":
        own = tokenizer.chat_template
        if not default:
            return own
        return ("{%- if not messages or messages[0]['role'] != 'system' -%}{%- set messages = "
                f"[{{'role': 'system', 'content': {json.dumps(default)}}}] + messages -%}}{{%- endif -%}}{own}")
    found = derive(template, tokenizer)
    body = (f"{{%- set ns = namespace(system={json.dumps(default)}, user='') -%}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
            "{%- elif message['role'] == 'user' -%}{%- set ns.user = message['content'] -%}{%- endif -%}"
            "{%- endfor -%}")
    plain = f"{_jinja_text(found.plain_head)}{{{{ ns.user }}}}{_jinja_text(found.plain_tail)}"
    if found.system_head is None:
        return body + plain
    with_system = (f"{_jinja_text(found.system_head)}{{{{ ns.system }}}}{_jinja_text(found.system_tail)}"
                   f"{{{{ ns.user }}}}{_jinja_text(found.system_user_tail)}")
    return body + f"{{%- if ns.system -%}}{with_system}{{%- else -%}}{plain}{{%- endif -%}}"


def _go_text(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(template: Template, tokenizer) -> str:
    """Ollama's TEMPLATE: one turn; Ollama cuts what follows {{ .Response }} while it generates."""
    found = derive(template, tokenizer)
    plain = f"{_go_text(found.plain_head)}{{{{ .Prompt }}}}{_go_text(found.plain_tail)}"
    tail = f"{{{{ .Response }}}}{_go_text(found.answer_tail)}"
    if found.system_head is None:
        return plain + tail
    with_system = (f"{_go_text(found.system_head)}{{{{ .System }}}}{_go_text(found.system_tail)}"
                   f"{{{{ .Prompt }}}}{_go_text(found.system_user_tail)}")
    return f"{{{{ if .System }}}}{with_system}{{{{ else }}}}{plain}{{{{ end }}}}{tail}"


def modelfile(gguf_name: str, template: Template, tokenizer, stops: list[str], adapter: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF beside it (paths relative to the Modelfile's folder)."""
    text = ollama_template(template, tokenizer)
    if '"""' in text or (template.system_prompt and '"""' in template.system_prompt):
        raise TemplateExportError('the template or system prompt contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f'TEMPLATE """{text}"""')
    if template.system_prompt:
        lines.append(f'SYSTEM """{template.system_prompt}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops) if stop]
    return "\n".join(lines) + "\n"
