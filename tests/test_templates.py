"""Templates and masking: decode the supervised tokens and compare them with the expected text.

Prompt tokens are never trained on (unless mask_prompt is false); every response and its EOS is;
in a multi-turn chat every assistant turn is, and nothing else.
"""

from __future__ import annotations

import copy

import pytest
from tiny import CHAT_TEMPLATE

from tunesmith.data.formats import Example, to_example
from tunesmith.data.templates import (
    ALPACA_HEAD,
    ALPACA_HEAD_INPUT,
    Encoder,
    choose,
    pieces,
    prompt_of,
    prompt_text,
)
from tunesmith.errors import ConfigError, DataError


def runs(tokenizer, ids: list[int], supervised: list[bool]) -> tuple[list[str], list[str]]:
    """Decoded text of each contiguous supervised run and of each unsupervised run."""
    trained, untrained, start = [], [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or supervised[end] != supervised[start]:
            text = tokenizer.decode(ids[start:end])
            (trained if supervised[start] else untrained).append(text)
            start = end
    return trained, untrained


def encode(tokenizer, spec: str, example: Example, mask_prompt: bool = True, system_prompt=None):
    template = choose(spec, tokenizer, system_prompt)
    ids, supervised = Encoder(tokenizer).encode(pieces(template, example, tokenizer), mask_prompt)
    assert len(ids) == len(supervised)
    return template, ids, supervised


QA_ROW = to_example({"question": "Capital of France?", "answer": "Paris"}, "d.jsonl:1", "qa")
ALPACA_ROW = to_example({"instruction": "Translate to English", "input": "chat", "output": "cat"},
                        "d.jsonl:2", "alpaca")
MULTI_TURN = to_example({"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]}, "d.jsonl:3", "messages")


def test_chat_template_supervises_only_the_answer_and_eos(tokenizer):
    template, ids, supervised = encode(tokenizer, "auto", QA_ROW)
    assert template.name == "chat"  # auto picks the model's own chat template
    trained, untrained = runs(tokenizer, ids, supervised)
    assert trained == ["Paris<|im_end|>"]
    assert untrained == ["<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"]
    assert ids[-1] == tokenizer.eos_token_id and supervised[-1]


def test_chat_template_with_system_prompt(tokenizer):
    _, ids, supervised = encode(tokenizer, "chat", QA_ROW, system_prompt="Be brief.")
    trained, untrained = runs(tokenizer, ids, supervised)
    assert trained == ["Paris<|im_end|>"]
    assert untrained == [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?"
                          "<|im_end|>\n<|im_start|>assistant\n")]


def test_multi_turn_chat_supervises_every_assistant_turn_and_nothing_else(tokenizer):
    _, ids, supervised = encode(tokenizer, "chat", MULTI_TURN)
    trained, untrained = runs(tokenizer, ids, supervised)
    assert trained == ["Hello!<|im_end|>", "Paris<|im_end|>"]
    assert untrained == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
    ]
    # the whole sequence is exactly the template's own rendering, up to the final EOS
    rendered = tokenizer.apply_chat_template(MULTI_TURN.messages, tokenize=False)
    assert tokenizer.decode(ids) == rendered[: rendered.rindex("<|im_end|>") + len("<|im_end|>")]


def test_alpaca_template(plain_tokenizer):
    _, ids, supervised = encode(plain_tokenizer, "alpaca", QA_ROW)
    trained, untrained = runs(plain_tokenizer, ids, supervised)
    assert trained == ["Paris<|endoftext|>"]
    assert untrained == [ALPACA_HEAD + "### Instruction:\nCapital of France?\n\n### Response:\n"]


def test_alpaca_template_with_input(plain_tokenizer):
    _, ids, supervised = encode(plain_tokenizer, "alpaca", ALPACA_ROW)
    trained, untrained = runs(plain_tokenizer, ids, supervised)
    assert trained == ["cat<|endoftext|>"]
    assert untrained == [ALPACA_HEAD_INPUT + "### Instruction:\nTranslate to English\n\n### Input:\nchat\n\n"
                         "### Response:\n"]


def test_qa_template(tokenizer):
    _, ids, supervised = encode(tokenizer, "qa", QA_ROW)
    trained, untrained = runs(tokenizer, ids, supervised)
    assert trained == ["Paris<|im_end|>"]
    assert untrained == ["### Question:\nCapital of France?\n### Answer:\n"]


def test_custom_string_template(tokenizer):
    _, ids, supervised = encode(tokenizer, "{system}Q: {prompt} [{input}]\nA: ", ALPACA_ROW,
                                system_prompt="Sys. ")
    trained, untrained = runs(tokenizer, ids, supervised)
    assert trained == ["cat<|im_end|>"]
    assert untrained == ["Sys. Q: Translate to English [chat]\nA: "]


@pytest.mark.parametrize("spec", ["chat", "alpaca", "qa", "Q: {prompt}\nA: "])
def test_mask_prompt_false_supervises_everything(tokenizer, spec):
    _, ids, supervised = encode(tokenizer, spec, QA_ROW, mask_prompt=False)
    assert all(supervised)
    _, masked_ids, masked = encode(tokenizer, spec, QA_ROW)
    assert ids == masked_ids  # the same tokens, only the labels differ
    assert not all(masked) and any(masked)


@pytest.mark.parametrize("spec", ["chat", "alpaca", "qa", "Q: {prompt}\nA: "])
def test_training_prompt_is_tokenized_as_generation_does(tokenizer, spec):
    """The unsupervised prefix is exactly the ids generate() feeds the model for this prompt."""
    template, ids, supervised = encode(tokenizer, spec, QA_ROW)
    prompt_ids = Encoder(tokenizer).encode_prompt(prompt_text(template, QA_ROW, tokenizer))
    assert ids[: len(prompt_ids)] == prompt_ids
    assert not any(supervised[: len(prompt_ids)]) and all(supervised[len(prompt_ids):])


@pytest.mark.parametrize(("spec", "row"), [(spec, row) for spec in ("chat", "alpaca", "qa", "Q: {prompt}\nA: ")
                                           for row in (QA_ROW, ALPACA_ROW, MULTI_TURN)
                                           if spec == "chat" or row is not MULTI_TURN])  # single-turn ones refuse it
def test_the_pieces_before_the_final_answer_are_the_generation_prompt(tokenizer, spec, row):
    """prepare takes each row's prompt from its pieces instead of rendering the template again."""
    template = choose(spec, tokenizer, "Be brief." if spec == "chat" else None)
    assert prompt_of(pieces(template, row, tokenizer)) == prompt_text(template, row, tokenizer)


def test_examples_tokenized_together_equal_each_alone(tokenizer):
    template, encoder = choose("chat", tokenizer), Encoder(tokenizer)
    rows = [QA_ROW, ALPACA_ROW, MULTI_TURN]
    together = encoder.encode_many([pieces(template, row, tokenizer) for row in rows])
    alone = [encoder.encode(pieces(template, row, tokenizer)) for row in rows]
    assert together == alone and len({len(ids) for ids, _ in together}) == 3


def test_plain_chat_fallback_template(plain_tokenizer):
    """A model without a chat template gets a plain ### User: / ### Assistant: one for `chat`."""
    _, ids, supervised = encode(plain_tokenizer, "chat", MULTI_TURN)
    trained, untrained = runs(plain_tokenizer, ids, supervised)
    assert trained == ["Hello!<|endoftext|>", "Paris<|endoftext|>"]
    assert untrained[0] == "Be brief.\n\n### User:\nHi\n\n### Assistant:\n"
    assert untrained[1] == "\n\n### User:\nCapital of France?\n\n### Assistant:\n"
    assert choose("auto", plain_tokenizer).name == "alpaca"  # auto does not pick the stand-in


def test_chat_template_without_eos_gets_one_added(plain_tokenizer):
    tokenizer = copy.deepcopy(plain_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE  # ends turns with <|im_end|>, but EOS is <|endoftext|>
    _, ids, supervised = encode(tokenizer, "chat", QA_ROW)
    trained, _ = runs(tokenizer, ids, supervised)
    assert trained == ["Paris<|im_end|>\n<|endoftext|>"]  # the model still learns to stop
    assert ids[-1] == tokenizer.eos_token_id


def test_single_turn_templates_refuse_multi_turn_rows(tokenizer):
    for spec in ("alpaca", "qa", "Q: {prompt}"):
        with pytest.raises(DataError, match=r"d\.jsonl:3: a multi-turn conversation needs data\.template"):
            pieces(choose(spec, tokenizer), MULTI_TURN, tokenizer)


def test_bad_custom_templates(tokenizer):
    with pytest.raises(ConfigError, match="lacks the {prompt} placeholder"):
        choose("Question: {question}", tokenizer)
    with pytest.raises(ConfigError, match=r"only \{prompt\}, \{input\} and \{system\}"):
        choose("{prompt} {answer}", tokenizer)


def bos_tokenizer(tokenizer):
    """The tiny tokenizer with a post-processor that prepends BOS, as Llama's and Gemma's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                special_tokens=[("<|endoftext|>", bos_id)])
    out = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    out.chat_template = tokenizer.chat_template
    return out, bos_id


def test_bos_is_added_once_and_never_supervised(tokenizer):
    bos_tok, bos_id = bos_tokenizer(tokenizer)
    encoder = Encoder(bos_tok)
    assert encoder.lead == [bos_id]
    ids, supervised = encoder.encode(pieces(choose("qa", bos_tok), QA_ROW, bos_tok))
    assert ids[0] == bos_id and ids.count(bos_id) == 1 and not supervised[0]
    assert runs(bos_tok, ids, supervised)[0] == ["Paris<|im_end|>"]
    ids, supervised = encoder.encode(pieces(choose("qa", bos_tok), QA_ROW, bos_tok), mask_prompt=False)
    assert ids[0] == bos_id and all(supervised)
    # a chat template that writes BOS itself does not get a second one
    bos_tok.chat_template = "<|endoftext|>" + CHAT_TEMPLATE
    ids, _ = encoder.encode(pieces(choose("chat", bos_tok), QA_ROW, bos_tok))
    assert ids[0] == bos_id and ids.count(bos_id) == 1
    prompt = prompt_text(choose("chat", bos_tok), QA_ROW, bos_tok)
    assert encoder.encode_prompt(prompt).count(bos_id) == 1
