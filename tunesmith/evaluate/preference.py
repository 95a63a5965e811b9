"""Held-out preference figures of one model (base or tuned) on a preference run's test split.

    preference_accuracy  share of test pairs whose chosen answer the model finds more likely than
                         the rejected one (summed log-probability: what it would rather generate).
                         KTO: over every (desirable, undesirable) couple of answers to the same
                         prompt, where the test rows have such couples (pairs turned into KTO rows)
    preference_pairs     how many pairs or couples that share is of
    logp_margin          mean per-token log-prob of chosen minus rejected answers (KTO: desirable
                         minus undesirable answers), in nats per token
    test_loss            cross-entropy per token on the chosen (desirable) answers only

The same numbers for the base and the tuned model show whether the preference was learned.
"""

from __future__ import annotations

import torch

from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.kernels import packed_attention, shares_prefixes
from tunesmith.train.loss import unwrap
from tunesmith.train.preference import _answer_start, pack_units, sequence_logps


@torch.no_grad()
def all_sequence_logps(model, split: TokenizedSplit, device, micro_batch_size: int = 8, paired: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths of every sequence of the split: (n,), (n,).
    Paired: micro batches of whole pairs, each pair's prompt held once (as in training)."""
    sums, counts = [], []
    share, size = shares_prefixes(unwrap(model)), micro_batch_size + (micro_batch_size % 2 if paired else 0)
    for start in range(0, len(split), size):
        sequences = [split.example(i) for i in range(start, min(start + size, len(split)))]
        batch = pack_units(paired, sequences, share).to(device)
        with packed_attention(unwrap(model)):
            total, count = sequence_logps(model, batch, 1024)
        sums.append(total.float().cpu())
        counts.append(count.float().cpu())
    return torch.cat(sums), torch.cat(counts)


def preference_scores(model, split: TokenizedSplit, paired: bool, device, micro_batch_size: int = 8) -> dict:
    sums, counts = all_sequence_logps(model, split, device, micro_batch_size, paired)
    good = split.labels.bool()
    test_loss = float(-sums[good].sum() / counts[good].sum().clamp(min=1))
    per_token = sums / counts.clamp(min=1)
    if paired:
        accuracy = float((sums[0::2] > sums[1::2]).float().mean())
        margin = float((per_token[0::2] - per_token[1::2]).mean())
        return {"preference_accuracy": accuracy, "preference_pairs": len(sums) // 2, "logp_margin": margin,
                "test_loss": test_loss}
    margin = float(per_token[good].mean() - per_token[~good].mean()) if good.any() and (~good).any() else 0.0
    couples = same_prompt_couples(split)
    if not couples:
        return {"logp_margin": margin, "test_loss": test_loss}
    desirable, undesirable = torch.tensor(couples).T
    accuracy = float((sums[desirable] > sums[undesirable]).float().mean())
    return {"preference_accuracy": accuracy, "preference_pairs": len(couples), "logp_margin": margin,
            "test_loss": test_loss}


def same_prompt_couples(split: TokenizedSplit) -> list[tuple[int, int]]:
    """(desirable, undesirable) row indices of KTO rows that answer the same prompt."""
    by_prompt: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
    for index in range(len(split)):
        ids, supervised = split.example(index)
        prompt = tuple(ids[:_answer_start(supervised, len(ids))].tolist())
        by_prompt.setdefault(prompt, ([], []))[0 if split.labels[index] else 1].append(index)
    return [(good, bad) for goods, bads in by_prompt.values() for good in goods for bad in bads]
