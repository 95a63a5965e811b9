"""Proof that a GGUF file answers in llama.cpp as the run does in tunesmith.

The file is loaded by llama.cpp's own library (libllama, through llama-cpp-python). Each held-out
prompt is rendered through the chat template stored *in the file*, tokenized by llama.cpp, and
answered greedily; the same prompt is answered greedily by tunesmith. Three things are compared:

    template   the file's template renders the prompt the run was trained on
    tokens     llama.cpp's token ids equal tunesmith's (no doubled or missing BOS)
    answers    identical greedy answers, and no answer that runs to the cap where tunesmith's stops
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith.errors import TunesmithError


class CheckError(TunesmithError):
    """The exported file does not answer as the run does."""


@dataclass
class Agreement:
    prompts: int = 0
    same_answers: int = 0
    template_differs: int = 0  # prompts the file's template renders differently from training
    alpaca_inputs: int = 0  # alpaca rows with an input field, which one chat message cannot carry
    tokens_differ: int = 0  # prompts llama.cpp tokenizes differently
    runaways: int = 0  # llama.cpp ran to the cap where tunesmith stopped
    tunesmith_stopped: int = 0
    examples: list[dict] = field(default_factory=list)  # the first few disagreements

    @property
    def rate(self) -> float:
        return self.same_answers / max(self.prompts, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "agreement": round(self.rate, 4)}


def render_with_file_template(llm, messages: list[dict]) -> str:
    """The prompt as a program reading the file would build it: its own tokenizer.chat_template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise CheckError("the GGUF has no tokenizer.chat_template")
    tokens = {name: _token_text(llm, key) for name, key in (("bos_token", "bos"), ("eos_token", "eos"))}
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **tokens)


def _token_text(llm, which: str) -> str:
    token_id = llm.metadata.get(f"tokenizer.ggml.{which}_token_id")
    if token_id is None:
        return ""
    return llm.detokenize([int(token_id)], special=True).decode("utf-8", errors="replace")


def open_gguf(path: Path, context: int, lora: Path | None = None):
    import llama_cpp

    threads = max(1, min(os.cpu_count() or 1, 8))
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                               lora_path=str(lora) if lora else None, verbose=False, seed=0)
    except (ValueError, RuntimeError) as err:
        raise CheckError(f"llama.cpp cannot load {path.name} ({err})") from None


def greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], bool]:
    """llama.cpp's greedy answer (ids without the stop token) and whether it stopped before the cap."""
    import llama_cpp

    answer: list[int] = []
    vocab = llm._model.vocab  # the vocabulary, for its own end-of-generation set
    llm.reset()
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token in stop_ids or llama_cpp.llama_vocab_is_eog(vocab, token):
            return answer, True
        answer.append(token)
        if len(answer) >= max_new_tokens:
            break
    return answer, False


def compare(path: Path, loaded, rows: list[dict], max_new_tokens: int, lora: Path | None = None) -> Agreement:
    """Answer `rows` (held-out {prompt, messages}) in llama.cpp and in tunesmith, and count agreement."""
    from tunesmith.infer.generate import generate_with_limits, stop_token_ids

    tokenizer, encoder = loaded.tokenizer, loaded.encoder
    ours, cut_off = generate_with_limits(loaded, [r["prompt"] for r in rows], max_new_tokens, batch_size=8)
    expected_ids = [encoder.encode_prompt(r["prompt"]) for r in rows]
    llm = open_gguf(path, max(len(ids) for ids in expected_ids) + max_new_tokens + 16, lora)
    result = Agreement(prompts=len(rows))
    stop_ids = set(stop_token_ids(loaded))
    for row, answer, ran_out, ids in zip(rows, ours, cut_off, expected_ids, strict=True):
        text = render_with_file_template(llm, row["messages"])
        if text != row["prompt"] and carries_alpaca_input(loaded.template, row["prompt"]):
            result.alpaca_inputs += 1
            text = row["prompt"]  # compared as a raw completion prompt, as llama.cpp users would send it
        result.template_differs += text != row["prompt"]
        llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        result.tokens_differ += llama_ids != ids
        answer_ids, stopped = greedy(llm, llama_ids, max_new_tokens, stop_ids)
        theirs = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        result.same_answers += theirs == answer
        result.tunesmith_stopped += not ran_out
        result.runaways += (not ran_out) and not stopped
        if theirs != answer and len(result.examples) < 3:
            result.examples.append({"prompt": row["prompt"], "tunesmith": answer, "llama.cpp": theirs})
    return result


def carries_alpaca_input(template, prompt: str) -> bool:
    return template.name == "alpaca" and "\n\n### Input:\n" in prompt


def verdict(result: Agreement, minimum: float, kind: str) -> str | None:
    """Why the file must not be kept, or None when it passes."""
    if result.template_differs:
        return (f"the file's chat template renders {result.template_differs} of {result.prompts} prompts "
                "differently from the run's training prompts")
    if result.tokens_differ:
        return (f"llama.cpp tokenizes {result.tokens_differ} of {result.prompts} prompts differently from the run "
                "(a doubled or missing BOS, or a different tokenizer)")
    if result.tunesmith_stopped and result.runaways * 2 >= result.tunesmith_stopped:
        return (f"llama.cpp never stops on {result.runaways} of {result.tunesmith_stopped} prompts where the run "
                "ends its answer: the end-of-answer token is not the file's stop token")
    if result.rate < minimum:
        return (f"only {result.same_answers} of {result.prompts} greedy answers are identical "
                f"({100 * result.rate:.0f}%; {kind} needs {100 * minimum:.0f}%)")
    return None
