"""Preference data: a prompt with a better and a worse answer, or one answer labelled good or bad.

Three row shapes, each becoming an `Example` whose last message is the (chosen) answer:

    preference  {"prompt", "chosen", "rejected"}: strings, or message lists (TRL's format; an
                UltraFeedback-style chosen/rejected holding the whole conversation is cut after
                the prompt)
    hh          {"chosen", "rejected"} only: two whole conversations sharing every turn but the
                last answer (Anthropic HH: "\\n\\nHuman: ...\\n\\nAssistant: ..." text, or message lists)
    kto         {"prompt", "completion", "label"}: label true/false, 1/0, desirable/undesirable

`tokenize_preference` turns them into sequences whose supervised tokens are the answer only:
pairs as two neighbouring sequences (chosen at 2i, rejected at 2i+1), KTO answers one each.
"""

from __future__ import annotations

import re

from tunesmith.config import PAIRED_METHODS
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.data.formats import PAIR_FORMATS, ROLES, Example
from tunesmith.data.templates import Encoder, Template, pieces, prompt_text
from tunesmith.data.text import within_length_limits
from tunesmith.errors import DataError

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
LABELS = {"true": True, "false": False, "1": True, "0": False, "desirable": True, "undesirable": False,
          "good": True, "bad": False, "yes": True, "no": False}


def to_preference_example(row: dict, where: str, fmt: str) -> Example:
    if fmt == "hh":
        prompt, chosen, rejected = _hh(row, where)
        return _example(prompt, chosen, row, where, rejected=rejected, used={"chosen", "rejected"})
    prompt = _prompt(row, where)
    if fmt == "kto":
        completion = _answer(row.get("completion"), prompt, where, "completion")
        return _example(prompt, completion, row, where, label=_label(row.get("label"), where),
                        used={"prompt", "completion", "label"})
    chosen = _answer(row.get("chosen"), prompt, where, "chosen")
    rejected = _answer(row.get("rejected"), prompt, where, "rejected")
    return _example(prompt, chosen, row, where, rejected=rejected, used={"prompt", "chosen", "rejected"})


def _example(prompt: list[dict], answer: str, row: dict, where: str, *, used: set, rejected: str | None = None,
             label: bool | None = None) -> Example:
    system = row.get("system")
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    extra = {k: v for k, v in row.items() if k not in used | {"system"} and isinstance(v, (str, int, float, bool))}
    return Example([*prompt, {"role": "assistant", "content": answer}], users[-1] if users else "", "", where,
                   extra, rejected=rejected, label=label)


def _prompt(row: dict, where: str) -> list[dict]:
    value = row.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return [{"role": "user", "content": value}]
    messages = _messages(value, where, "prompt")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: 'prompt' ends with an assistant message; the answers belong in "
                        "chosen/rejected (or completion)")
    return messages


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be text or a non-empty list of {{role, content}} messages")
    out = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise DataError(f"{where}: {key} message {number} needs a role ({', '.join(sorted(ROLES))}) "
                            "and text content")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _answer(value, prompt: list[dict], where: str, key: str) -> str:
    """The answer text of chosen/rejected/completion: a string, one assistant message, or the whole
    conversation (the prompt's messages, then one assistant message)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return value
    if value is None:
        raise DataError(f"{where}: field {key!r} is missing or null")
    messages = _messages(value, where, key)
    if messages[: len(prompt)] == prompt and len(messages) > len(prompt):
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: {key} must be one assistant answer (or the prompt's messages followed by "
                        "one), got roles " + ", ".join(m["role"] for m in messages))
    if not messages[0]["content"].strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return messages[0]["content"]


def _hh(row: dict, where: str) -> tuple[list[dict], str, str]:
    """Two whole conversations → (shared prompt, chosen answer, rejected answer)."""
    chosen, rejected = (_conversation(row.get(key), where, key) for key in ("chosen", "rejected"))
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    tails = chosen[shared:], rejected[shared:]
    if not prompt or any(len(tail) != 1 or tail[0]["role"] != "assistant" for tail in tails):
        raise DataError(f"{where}: chosen and rejected must be the same conversation up to their last "
                        "answer (an assistant turn); these differ earlier")
    for key, tail in zip(("chosen", "rejected"), tails):
        if not tail[0]["content"].strip():
            raise DataError(f"{where}: the last answer of {key!r} is empty")
    return prompt, tails[0][0]["content"], tails[1][0]["content"]


def _conversation(value, where: str, key: str) -> list[dict]:
    if isinstance(value, list):
        return _messages(value, where, key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a conversation (text or messages)")
    text = value if value.startswith("\n\n") else "\n\n" + value
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        raise DataError(f"{where}: {key} has no '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns")
    turns = zip(parts[1::2], parts[2::2])
    return [{"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in turns]


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower() if isinstance(value, (str, int, float)) else None
    if key not in LABELS:
        raise DataError(f"{where}: field 'label' is {value!r}; expected true/false, 1/0 or "
                        "desirable/undesirable")
    return LABELS[key]


def tokenize_preference(examples: list[Example], fmt: str, objective: str, template: Template, tokenizer,
                        max_seq_length: int, min_tokens: int = 0, max_tokens: int | None = None
                        ) -> tuple[TokenizedSplit, list[dict], dict]:
    """Pairs → chosen and rejected sequences side by side (labels 1, 0); KTO → one sequence per
    answer with its label (a pair gives one desirable and one undesirable answer). Only answer
    tokens are supervised: the prompt's earlier assistant turns are context."""
    encoder = Encoder(tokenizer)
    template = Template(template.name, template.text, template.system_prompt, last_turn_only=True)
    ids_list, sup_list, labels, rows = [], [], [], []
    stats = {"rows": len(examples), "examples": 0, "truncated": 0, "truncated_chosen": 0,
             "truncated_rejected": 0, "dropped_no_response": 0, "too_short": 0, "too_long": 0, "tokens": 0,
             "supervised_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0, "chosen_longer": 0,
             "desirable": 0, "undesirable": 0}
    for example in examples:
        answers = _answers(example)
        encoded = [encoder.encode(pieces(template, _with_answer(example, text), tokenizer)) for text, _ in answers]
        if not within_length_limits(max(len(ids) for ids, _ in encoded), min_tokens, max_tokens, stats):
            continue
        cut = [_truncate(ids, sup, max_seq_length) for ids, sup in encoded]
        if any(not any(sup[1:]) for _, sup in cut):
            stats["dropped_no_response"] += 1
            continue
        if objective in PAIRED_METHODS:
            _count_pair(stats, encoded, cut, max_seq_length)
        for (ids, sup), (text, label) in zip(cut, answers):
            ids_list.append(ids)
            sup_list.append(sup)
            labels.append(label)
            stats["tokens"] += len(ids)
            stats["supervised_tokens"] += sum(sup)
            stats["desirable" if label else "undesirable"] += 1
            if objective == "kto":
                rows.append(_row(example, template, tokenizer, text, label))
        if objective in PAIRED_METHODS:
            rows.append(_row(example, template, tokenizer, example.reference, None))
        stats["examples"] += 1
    return TokenizedSplit.from_lists(ids_list, sup_list, labels), rows, stats


def _answers(example: Example) -> list[tuple[str, bool]]:
    if example.rejected is not None:
        return [(example.reference, True), (example.rejected, False)]
    return [(example.reference, bool(example.label))]


def _with_answer(example: Example, text: str) -> Example:
    return Example([*example.prompt_messages, {"role": "assistant", "content": text}], example.instruction,
                   example.input, example.where, example.extra)


def _truncate(ids: list[int], supervised: list[bool], max_seq_length: int) -> tuple[list[int], list[bool]]:
    return ids[:max_seq_length], supervised[:max_seq_length]


def _count_pair(stats: dict, encoded: list, cut: list, max_seq_length: int) -> None:
    (chosen_ids, _), (rejected_ids, _) = encoded
    stats["truncated_chosen"] += len(chosen_ids) > max_seq_length
    stats["truncated_rejected"] += len(rejected_ids) > max_seq_length
    stats["truncated"] += len(chosen_ids) > max_seq_length or len(rejected_ids) > max_seq_length
    chosen_answer, rejected_answer = (sum(sup) for _, sup in cut)
    stats["chosen_tokens"] += chosen_answer
    stats["rejected_tokens"] += rejected_answer
    stats["chosen_longer"] += chosen_answer > rejected_answer


def _row(example: Example, template: Template, tokenizer, reference: str, label: bool | None) -> dict:
    row = {"where": example.where, "prompt": prompt_text(template, example, tokenizer),
           "messages": example.prompt_messages, "reference": reference, "extra": example.extra}
    if label is None:
        row["rejected"] = example.rejected
    else:
        row["label"] = label
    return row


def check_format(fmt: str, objective: str, source: str) -> None:
    """Preference methods need preference rows, and supervised methods need answers to imitate."""
    if objective == "sft" and fmt in PAIR_FORMATS + ("kto",):
        raise DataError(f"{source} has preference rows ({fmt}); train them with method dpo, orpo, simpo or kto "
                        "(supervised methods need one answer per prompt)")
    if objective in PAIRED_METHODS and fmt not in PAIR_FORMATS:
        raise DataError(f"{source} has {fmt} rows; method={objective} needs pairs: prompt/chosen/rejected, "
                        "or chosen/rejected conversations")
    if objective == "kto" and fmt not in PAIR_FORMATS + ("kto",):
        raise DataError(f"{source} has {fmt} rows; method=kto needs prompt/completion/label rows (or pairs)")
