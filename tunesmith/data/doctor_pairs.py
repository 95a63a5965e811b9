"""The data doctor's look at preference pairs: length bias, truncation of either side, identical pairs.

A preference is learned from what differs between the chosen and the rejected answer. When the
chosen one is nearly always the longer (or shorter), the cheapest thing to learn is the length.
"""

from __future__ import annotations

from tunesmith.data.formats import Example
from tunesmith.data.templates import Encoder, Template, pieces

LENGTH_BIAS = 0.8  # chosen longer (or shorter) in more than this share of pairs


def pair_stats(examples: list[Example], template: Template, tokenizer, max_seq_length: int) -> dict:
    encoder = Encoder(tokenizer)
    chosen_lengths, rejected_lengths, cut = [], [], {"chosen": 0, "rejected": 0}
    for example in examples:
        if example.rejected is None:
            continue
        for side, text, lengths in (("chosen", example.reference, chosen_lengths),
                                    ("rejected", example.rejected, rejected_lengths)):
            answer = Example([*example.prompt_messages, {"role": "assistant", "content": text}])
            ids, supervised = encoder.encode(pieces(template, answer, tokenizer))
            lengths.append(sum(supervised))
            cut[side] += len(ids) > max_seq_length
    pairs = len(chosen_lengths)
    longer = sum(c > r for c, r in zip(chosen_lengths, rejected_lengths))
    shorter = sum(c < r for c, r in zip(chosen_lengths, rejected_lengths))
    return {"pairs": pairs, "chosen_longer_share": longer / pairs if pairs else 0.0,
            "chosen_shorter_share": shorter / pairs if pairs else 0.0,
            "chosen_mean_tokens": sum(chosen_lengths) / pairs if pairs else 0.0,
            "rejected_mean_tokens": sum(rejected_lengths) / pairs if pairs else 0.0,
            "truncated_chosen": cut["chosen"], "truncated_rejected": cut["rejected"]}


def pair_findings(stats: dict, identical: int, max_seq_length: int) -> list[dict]:
    out = []
    if identical:
        out.append({"level": "warning", "message": f"{identical} pairs had the same chosen and rejected answer "
                    "(nothing to learn from them); they were removed (cleaning: identical_pairs)"})
    for share, word in ((stats["chosen_longer_share"], "longer"), (stats["chosen_shorter_share"], "shorter")):
        if stats["pairs"] >= 10 and share > LENGTH_BIAS:
            out.append({"level": "warning", "message": (
                f"the chosen answer is the {word} one in {100 * share:.0f}% of pairs "
                f"({stats['chosen_mean_tokens']:.0f} vs {stats['rejected_mean_tokens']:.0f} answer tokens on "
                f"average): the model may learn '{word} wins' rather than the preference; balance the pairs, "
                "or use method simpo (it scores answers per token)")})
    if stats["truncated_chosen"] or stats["truncated_rejected"]:
        out.append({"level": "warning", "message": (
            f"{stats['truncated_chosen']} chosen and {stats['truncated_rejected']} rejected answers run past "
            f"max_seq_length={max_seq_length} and are cut: the part that decides the preference may be lost; "
            "raise data.max_seq_length")})
    return out
