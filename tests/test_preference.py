"""Preference tuning (train/preference.py, data/pairs.py).

Every loss and its gradients against the papers' formulas, written here in plain PyTorch: one
unpacked forward per sequence, log-softmax, the answer tokens gathered and summed. The reference
model is the same LoRA model with its adapter switched off (or, for full fine-tunes, a second
copy of the starting weights). Then: packing a step differently does not change it, a planted
preference is learned through the real CLI, and preference data is laid out and checked as
documented."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import write_jsonl

from tunesmith import config as config_module
from tunesmith.config import TrainConfig
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.preference import Preference, Settings, compute_references

NO_AUTOCAST = torch.autocast("cpu", dtype=torch.float32, enabled=False)  # what the loop uses in fp32
CPU = torch.device("cpu")


# ---------------------------------------------------------------- data and models for the reference checks

def random_tokens(generator, count: int, vocab_size: int) -> list[int]:
    return torch.randint(3, vocab_size, (count,), generator=generator).tolist()  # 0-2 are special tokens


def synthetic_pairs(vocab_size: int, n_pairs: int = 4, seed: int = 2) -> list[tuple[list, list, list]]:
    """(prompt, answer, trailer) token lists: pair i is sequences 2i (chosen) and 2i+1 (rejected), one
    prompt, answers of different lengths; some end with a token after the answer that is context only
    (as a chat template's newline after the end-of-turn token)."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for i in range(n_pairs):
        prompt = random_tokens(generator, 3 + 2 * i, vocab_size)
        trailer = random_tokens(generator, 1, vocab_size) if i % 2 else []
        sequences.append((prompt, random_tokens(generator, 2 + 3 * i, vocab_size), trailer))
        sequences.append((prompt, random_tokens(generator, 7 - i, vocab_size), trailer))
    return sequences


def synthetic_answers(vocab_size: int, seed: int = 9) -> tuple[list[tuple[list, list, list]], list[bool]]:
    """KTO: eight answers labelled desirable or not (unevenly); the first two answer one prompt."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for i in range(8):
        prompt = random_tokens(generator, 3 + i % 4, vocab_size) if i != 1 else sequences[0][0]
        answer = random_tokens(generator, 2 + (3 * i) % 7, vocab_size)
        sequences.append((prompt, answer, random_tokens(generator, 1, vocab_size) if i % 3 == 0 else []))
    return sequences, [True, True, False, True, False, False, True, False]


def split_of(sequences, labels) -> TokenizedSplit:
    ids = [prompt + answer + trailer for prompt, answer, trailer in sequences]
    supervised = [[False] * len(prompt) + [True] * len(answer) + [False] * len(trailer)
                  for prompt, answer, trailer in sequences]
    return TokenizedSplit.from_lists(ids, supervised, [bool(label) for label in labels])


def pair_labels(sequences) -> list[bool]:
    return [i % 2 == 0 for i in range(len(sequences))]


def lora_model(llama, seed: int = 1):
    """The PEFT model exactly as finetune builds it (dropout 0), with its adapter moved off zero so
    that the policy differs from the reference."""
    from tunesmith.model.adapters import prepare_for_training
    from tunesmith.model.load import load_model

    config = config_module.build({"method": "dpo", "lora": {"dropout": 0.0}})
    model = prepare_for_training(load_model(llama), config, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # both factors from this seed (PEFT draws A from the global stream)
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.train()
    return model


@pytest.fixture(scope="module")
def adapted(llama):
    return lora_model(llama)


def objective_of(settings: Settings, split: TokenizedSplit, references=None) -> Preference:
    train = TrainConfig(loss_chunk_size=16, batch_size=8, micro_batch_size=8, eval_iters=2)
    return Preference(settings, {"train": split}, train, CPU, NO_AUTOCAST, max_length=512,
                      references=references)


def tunesmith_step(objective: Preference, model, micro_batches: list[list[int]]):
    """One Preference.step: (step loss, figures, gradient of every trainable parameter)."""
    model.zero_grad(set_to_none=True)
    loss, figures = objective.step(model, [objective.batch("train", ids) for ids in micro_batches])
    return float(loss), {k: float(v) for k, v in figures.items()}, gradients(model)


def gradients(model) -> dict[str, torch.Tensor]:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values())  # every trained weight got one
    return {name: p.grad.clone() for name, p in trainable.items()}


# ---------------------------------------------------------------- the reference: plain PyTorch, unpacked

def paper_logp(model, prompt: list[int], answer: list[int], trailer: list[int]) -> torch.Tensor:
    """log π(answer | prompt) = Σ_k log p(answer_k | prompt, answer_<k), from an ordinary forward."""
    ids = torch.tensor([prompt + answer + trailer])  # (1, T)
    logits = model(input_ids=ids).logits[0].float()  # (T, vocab)
    logp = torch.log_softmax(logits, dim=-1)
    where = torch.arange(len(prompt), len(prompt) + len(answer))  # positions of the answer tokens
    return logp[where - 1, ids[0, where]].sum()  # each is predicted by the position before it


def paper_logps(model, sequences) -> torch.Tensor:
    return torch.stack([paper_logp(model, *sequence) for sequence in sequences])  # (n,)


def reference_of_adapter(model):
    """The reference model of an adapter run: the same PEFT model, adapter off."""
    def logps(sequences):
        with torch.no_grad(), model.disable_adapter():
            return paper_logps(model, sequences)
    return logps


def reference_of_copy(base):
    def logps(sequences):
        with torch.no_grad():
            return paper_logps(base, sequences)
    return logps


def mismatched_sequences(sequences):
    """KTO's KL estimate pairs answer i's prompt with the answer of the next row (cyclically) that
    answers another prompt."""
    out = []
    for i, (prompt, _, _) in enumerate(sequences):
        j = next(k % len(sequences) for k in range(i + 1, i + len(sequences))
                 if sequences[k % len(sequences)][0] != prompt)
        out.append((prompt, *sequences[j][1:]))
    return out


def paper_pair_loss(s: dict, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
    """Per pair, straight from the papers."""
    beta = s["beta"]
    if s["method"] == "dpo":  # Rafailov et al. 2023; IPO: Azar et al. 2023; hinge: SLiC, Zhao et al. 2023
        h = (chosen - ref_chosen) - (rejected - ref_rejected)  # log-ratio difference, no β
        if s["loss_type"] == "ipo":
            return (h - 1 / (2 * beta)) ** 2
        if s["loss_type"] == "hinge":
            return torch.clamp(1 - beta * h, min=0)
        eps = s["label_smoothing"]
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    mean_chosen, mean_rejected = chosen / chosen_len, rejected / rejected_len  # mean token log-probs
    if s["method"] == "orpo":  # Hong et al. 2024: L_SFT + λ·L_OR with odds(y) = P(y) / (1 − P(y))
        p_chosen, p_rejected = mean_chosen.exp(), mean_rejected.exp()  # P(y): the per-token likelihood
        log_odds_ratio = torch.log(p_chosen / (1 - p_chosen)) - torch.log(p_rejected / (1 - p_rejected))
        return -mean_chosen - beta * F.logsigmoid(log_odds_ratio)
    assert s["method"] == "simpo"  # Meng et al. 2024
    return -F.logsigmoid(beta * (mean_chosen - mean_rejected) - s["gamma"])


def paper_kto_loss(s: dict, policy, reference, desirable, z):
    """Ethayarajh et al. 2024: λ_D(1 − σ(β(r − z))) for desirable answers, λ_U(1 − σ(β(z − r))) for
    undesirable ones, r the log-ratio of policy and reference."""
    r = policy - reference
    good = s["desirable_weight"] * (1 - torch.sigmoid(s["beta"] * (r - z)))
    bad = s["undesirable_weight"] * (1 - torch.sigmoid(s["beta"] * (z - r)))
    return torch.where(desirable, good, bad)


def paper_step(model, s: dict, sequences, labels, reference_logps, units: list[int]):
    """The step loss over `units` (pairs, or KTO answers) and its gradients, by the papers' formulas."""
    model.zero_grad(set_to_none=True)
    if s["method"] == "kto":
        step_sequences = [sequences[i] for i in units]
        with torch.no_grad():  # z is a baseline: no gradient flows through it
            kl = mismatched_sequences(sequences)
            kl_step = [kl[i] for i in units]
            z = torch.clamp((paper_logps(model, kl_step) - reference_logps(kl_step)).mean(), min=0)
        policy = paper_logps(model, step_sequences)
        desirable = torch.tensor([bool(labels[i]) for i in units])
        reference = reference_logps(step_sequences)
        losses = paper_kto_loss(s, policy, reference, desirable, z)
        extra = {"z": float(z), "policy": policy.detach(), "reference": reference, "desirable": desirable}
    else:
        chosen = [sequences[2 * i] for i in units]
        rejected = [sequences[2 * i + 1] for i in units]
        policy_c, policy_r = paper_logps(model, chosen), paper_logps(model, rejected)
        ref_c = reference_logps(chosen) if s["method"] == "dpo" else None
        ref_r = reference_logps(rejected) if s["method"] == "dpo" else None
        lengths_c = torch.tensor([float(len(a)) for _, a, _ in chosen])
        lengths_r = torch.tensor([float(len(a)) for _, a, _ in rejected])
        losses = paper_pair_loss(s, policy_c, policy_r, ref_c, ref_r, lengths_c, lengths_r)
        extra = {"policy_c": policy_c.detach(), "policy_r": policy_r.detach(), "ref_c": ref_c,
                 "ref_r": ref_r, "lengths_c": lengths_c, "lengths_r": lengths_r}
    loss = losses.mean()
    loss.backward()
    return float(loss.detach()), gradients(model), extra


def assert_same_gradients(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys() and got
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-3  # a real gradient, not zeros that match anything
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def settings_of(s: dict) -> Settings:
    return Settings(s["method"], s["beta"], s.get("loss_type", "sigmoid"), s.get("label_smoothing", 0.0),
                    s.get("gamma", 0.5), s.get("desirable_weight", 1.0), s.get("undesirable_weight", 1.0))


CASES = {
    "dpo-sigmoid": {"method": "dpo", "beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0},
    "dpo-smoothed": {"method": "dpo", "beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.2},
    "dpo-ipo": {"method": "dpo", "beta": 0.5, "loss_type": "ipo", "label_smoothing": 0.0},
    "dpo-hinge": {"method": "dpo", "beta": 2.0, "loss_type": "hinge", "label_smoothing": 0.0},
    "orpo": {"method": "orpo", "beta": 0.5},
    "simpo": {"method": "simpo", "beta": 2.0, "gamma": 0.7},
    "kto": {"method": "kto", "beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.7},
}


def case_data(s: dict, vocab_size: int):
    if s["method"] == "kto":
        sequences, labels = synthetic_answers(vocab_size)
        return sequences, labels, [[5, 0, 2], [1, 3, 4, 6, 7]]  # uneven micro batches, out of order
    sequences = synthetic_pairs(vocab_size)
    return sequences, pair_labels(sequences), [[2, 0], [1, 3]]


# ---------------------------------------------------------------- losses and gradients against the papers

@pytest.mark.parametrize("case", list(CASES))
def test_lora_step_matches_the_papers(adapted, case):
    """Preference.step's loss and the gradient of every LoRA weight equal the papers' loss computed
    one unpacked sequence at a time, with the reference the same model with its adapter off."""
    s = CASES[case]
    sequences, labels, micro_batches = case_data(s, adapted.config.vocab_size)
    objective = objective_of(settings_of(s), split_of(sequences, labels))
    units = sorted(i for ids in micro_batches for i in ids)

    loss, figures, grads = tunesmith_step(objective, adapted, micro_batches)
    reference = reference_of_adapter(adapted)
    want_loss, want_grads, extra = paper_step(adapted, s, sequences, labels, reference, units)

    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert_same_gradients(grads, want_grads, rtol=1e-5)
    if s["method"] == "dpo":  # the rewards it reports: β(π − ref), accuracy and margin over the pairs
        reward_c = s["beta"] * (extra["policy_c"] - extra["ref_c"])
        reward_r = s["beta"] * (extra["policy_r"] - extra["ref_r"])
        assert figures["reward_chosen"] == pytest.approx(float(reward_c.mean()), rel=1e-5, abs=1e-5)
        margin = reward_c - reward_r
        assert figures["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-5, abs=1e-5)
        assert figures["reward_accuracy"] == float((margin > 0).float().mean()) == 0.5
        if s["loss_type"] == "hinge":  # the hinge at 1 is passed by some pairs and not by others
            assert (margin > 1).any() and (margin < 1).any()
        mean_logp = extra["policy_r"] / extra["lengths_r"]  # per answer token
        assert figures["logp_rejected"] == pytest.approx(float(mean_logp.mean()), rel=1e-5)
    if s["method"] == "kto":
        assert extra["z"] > 0.05  # the reference point is active here (clamped at 0 it would test nothing)
        reward = s["beta"] * (extra["policy"] - extra["reference"])
        desirable, z_reward = extra["desirable"], s["beta"] * extra["z"]
        assert figures["reward_chosen"] == pytest.approx(float(reward[desirable].mean()), rel=1e-5, abs=1e-5)
        assert figures["reward_rejected"] == pytest.approx(float(reward[~desirable].mean()), rel=1e-5,
                                                           abs=1e-5)
        on_their_side = torch.where(desirable, reward > z_reward, reward < z_reward)
        assert figures["reward_accuracy"] == float(on_their_side.float().mean())


def test_the_reference_is_the_base_model_and_differs_from_the_policy(llama, adapted):
    """The adapter switched off gives the base model's log-probs (a second copy loaded from disk),
    and those are not the policy's: every DPO check above would fail if the adapter stayed on."""
    from tunesmith.model.load import load_model

    sequences = synthetic_pairs(adapted.config.vocab_size)
    base = load_model(llama)
    with torch.no_grad():
        off = reference_of_adapter(adapted)(sequences)
        copy = reference_of_copy(base)(sequences)
        policy = paper_logps(adapted, sequences)
    torch.testing.assert_close(off, copy, rtol=1e-5, atol=1e-5)
    assert (policy - off).abs().min() > 0.01, (policy - off)
    s = CASES["dpo-sigmoid"]
    labels, units = pair_labels(sequences), [0, 1, 2, 3]
    loss = tunesmith_step(objective_of(settings_of(s), split_of(sequences, labels)), adapted, [units])[0]
    with_copy = paper_step(adapted, s, sequences, labels, reference_of_copy(base), units)[0]
    adapter_on = reference_of_copy(adapted)  # a reference that forgot to switch the adapter off
    assert loss == pytest.approx(with_copy, rel=1e-5)
    assert abs(loss - paper_step(adapted, s, sequences, labels, adapter_on, units)[0]) > 1e-3


@pytest.mark.parametrize("case", ["dpo-sigmoid", "kto"])
def test_full_fine_tune_step_matches_the_papers_with_stored_references(llama, case):
    """preference.weights full: the starting weights' log-probs are computed once (compute_references)
    and the step uses them after the weights have moved; the reference here is a second copy of the
    starting model."""
    from tunesmith.model.load import load_model

    s = CASES[case]
    policy, base = load_model(llama), load_model(llama)
    policy.requires_grad_(True)
    policy.train()
    sequences, labels, micro_batches = case_data(s, policy.config.vocab_size)
    objective = objective_of(settings_of(s), split_of(sequences, labels))
    references = compute_references(policy, objective, ["train"])
    reference = reference_of_copy(base)
    torch.testing.assert_close(references["train"], reference(sequences), rtol=1e-5, atol=1e-5)
    if s["method"] == "kto":
        torch.testing.assert_close(references["train_kl"], reference(mismatched_sequences(sequences)),
                                   rtol=1e-5, atol=1e-5)
    objective.references = references
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "training so far": the policy moves away from the stored reference
        for parameter in policy.parameters():
            if parameter.ndim == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    units = sorted(i for ids in micro_batches for i in ids)

    loss, _, grads = tunesmith_step(objective, policy, micro_batches)
    want_loss, want_grads, extra = paper_step(policy, s, sequences, labels, reference, units)

    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert_same_gradients(grads, want_grads, rtol=1e-5)
    with torch.no_grad():
        moved = paper_logps(policy, sequences) - references["train"]
    assert moved.abs().min() > 0.01  # the stored reference is not the current policy
    if s["method"] == "kto":
        assert extra["z"] > 0.05


@pytest.mark.parametrize("case", ["dpo-sigmoid", "kto"])
def test_validation_matches_the_papers(adapted, case):
    """validate() scores the first micro_batch_size x eval_iters units of val (KTO: its z over those)."""
    s = CASES[case]
    sequences, labels, _ = case_data(s, adapted.config.vocab_size)
    train = TrainConfig(loss_chunk_size=16, batch_size=2, micro_batch_size=2, eval_iters=2)
    objective = Preference(settings_of(s), {"val": split_of(sequences, labels)}, train, CPU, NO_AUTOCAST, 512)
    figures = objective.validate(adapted)
    reference = reference_of_adapter(adapted)
    want_loss, _, extra = paper_step(adapted, s, sequences, labels, reference, [0, 1, 2, 3])
    assert figures["val_loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    if s["method"] == "kto":
        assert extra["z"] > 0.05
        reward, desirable = s["beta"] * (extra["policy"] - extra["reference"]), extra["desirable"]
        z_reward = s["beta"] * extra["z"]
        on_their_side = torch.where(desirable, reward > z_reward, reward < z_reward)
    else:
        margin = s["beta"] * ((extra["policy_c"] - extra["ref_c"]) - (extra["policy_r"] - extra["ref_r"]))
        on_their_side = margin > 0
    assert figures["val_reward_accuracy"] == float(on_their_side.float().mean())
    assert adapted.training  # back in training mode


# ---------------------------------------------------------------- packing does not change a step

@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_one_packed_micro_batch_equals_four_single_pair_micro_batches(adapted, method):
    s = next(case for case in CASES.values() if case["method"] == method)
    sequences, labels, _ = case_data(s, adapted.config.vocab_size)
    objective = objective_of(settings_of(s), split_of(sequences, labels))
    packed_loss, packed_figures, packed = tunesmith_step(objective, adapted, [[0, 1, 2, 3]])  # 4 pairs x 1
    for micro_batches in ([[0], [1], [2], [3]], [[3], [2, 0, 1]]):  # 1 x 4, and uneven in another order
        loss, figures, grads = tunesmith_step(objective, adapted, micro_batches)
        assert loss == pytest.approx(packed_loss, rel=1e-6)
        assert_same_gradients(grads, packed, rtol=1e-6)
        assert figures.keys() == packed_figures.keys()
        for key, value in packed_figures.items():  # rewards are differences of ~50-nat log-probs: abs 1e-5
            assert figures[key] == pytest.approx(value, rel=1e-6, abs=1e-5), key


def long_prompt_pairs(vocab_size: int, system: int) -> list[tuple[list, list, list]]:
    """Four pairs whose prompts (12-18 tokens after `system` tokens every prompt begins with) are
    long enough to be held once per pair."""
    generator = torch.Generator().manual_seed(4)
    block = random_tokens(generator, system, vocab_size)
    sequences = []
    for i in range(4):
        prompt = block + random_tokens(generator, 12 + 2 * i, vocab_size)
        trailer = random_tokens(generator, 1, vocab_size) if i % 2 else []
        sequences.append((prompt, random_tokens(generator, 2 + 3 * i, vocab_size), trailer))
        sequences.append((prompt, random_tokens(generator, 7 - i, vocab_size), trailer))
    return sequences


@pytest.mark.parametrize("case, system", [("dpo-sigmoid", 10), ("orpo", 0)])
def test_a_pairs_prompt_is_computed_once_with_the_papers_loss_and_gradients(adapted, case, system):
    """With share_prefix (finetune's default on a CPU), what every prompt begins with (a system
    block) is one segment of the packed row, each pair's prompt after it another, and both answers
    attend to them: the step still equals the papers' loss and gradients computed one unpacked
    sequence at a time, over fewer tokens through the model."""
    s = CASES[case]
    sequences = long_prompt_pairs(adapted.config.vocab_size, system)
    labels = pair_labels(sequences)
    train = TrainConfig(loss_chunk_size=16, batch_size=8, micro_batch_size=8, eval_iters=2)
    shared = Preference(settings_of(s), {"train": split_of(sequences, labels)}, train, CPU, NO_AUTOCAST,
                        max_length=512, share_prefix=True)
    batch = shared.batch("train", [0, 1, 2, 3])
    if system:  # the block, then per pair: its prompt's rest (continuing the block), chosen, rejected
        assert batch.packed.parents == (-1, 0, 1, 1, 0, 4, 4, 0, 7, 7, 0, 10, 10)
        assert batch.packed.context_lengths[2] == 10 + 11 and batch.packed.segments[0] == (0, 10)
    else:
        assert batch.packed.parents == (-1, 0, 0, -1, 3, 3, -1, 6, 6, -1, 9, 9)
    plain = objective_of(settings_of(s), split_of(sequences, labels)).batch("train", [0, 1, 2, 3])
    held_once = 7 * system + sum(len(prompt) - system - 1 for prompt, _, _ in sequences[::2])
    assert batch.n_tokens == plain.n_tokens and batch.n_computed == plain.n_computed - held_once

    loss, _, grads = tunesmith_step(shared, adapted, [[2, 0], [1, 3]])
    want_loss, want_grads, _ = paper_step(adapted, s, sequences, labels, reference_of_adapter(adapted),
                                          [0, 1, 2, 3])
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert_same_gradients(grads, want_grads, rtol=1e-5)
    full = Preference(settings_of(s), {"train": split_of(sequences, labels)}, train, CPU, NO_AUTOCAST,
                      max_length=512, share_prefix=True)  # a full fine-tune's stored references
    with torch.no_grad():
        want_references = paper_logps(adapted, sequences)
    torch.testing.assert_close(compute_references(adapted, full, ["train"])["train"], want_references,
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- held-out figures (evaluate) against the sums

def test_held_out_pair_figures_are_the_papers_sums(adapted, monkeypatch):
    """evaluate's figures of a paired run (packed in micro batches of 3 sequences, rounded up to whole
    pairs; the prompts of 9-13 tokens, pairs 3-5, are held once) from one plain forward per sequence."""
    from tunesmith.evaluate import preference as evaluate_preference
    from tunesmith.evaluate.preference import preference_scores
    from tunesmith.train.preference import pack_units

    sequences = synthetic_pairs(adapted.config.vocab_size, n_pairs=6)
    packed = []  # the rows it packs
    monkeypatch.setattr(evaluate_preference, "pack_units",
                        lambda paired, rows, share: packed.append(pack_units(paired, rows, share)) or packed[-1])
    scores = preference_scores(adapted, split_of(sequences, pair_labels(sequences)), True, CPU, micro_batch_size=3)
    assert [batch.parents for batch in packed] == [(), (-1, -1, -1, 2, 2), (-1, 0, 0, -1, 3, 3)]
    with torch.no_grad():
        logps = paper_logps(adapted, sequences)
    lengths = torch.tensor([float(len(answer)) for _, answer, _ in sequences])
    per_token = logps / lengths
    assert scores["preference_pairs"] == 6
    assert scores["preference_accuracy"] == pytest.approx(float((logps[0::2] > logps[1::2]).float().mean()))
    assert 0 < scores["preference_accuracy"] < 1  # both outcomes occur: the comparison is really made
    assert scores["logp_margin"] == pytest.approx(float((per_token[0::2] - per_token[1::2]).mean()), abs=1e-5)
    assert scores["test_loss"] == pytest.approx(float(-logps[0::2].sum() / lengths[0::2].sum()), abs=1e-5)


def test_held_out_kto_rows_answering_one_prompt_are_ranked_as_couples(adapted):
    """KTO rows made from pairs (one desirable and one undesirable answer per prompt, plus a prompt with
    two of each and one answered once): preference_accuracy is over every (desirable, undesirable)
    couple of one prompt; without any such couple there is none."""
    from tunesmith.evaluate.preference import preference_scores

    vocab = adapted.config.vocab_size
    pairs = synthetic_pairs(vocab, n_pairs=5)
    extra = synthetic_pairs(vocab, n_pairs=2, seed=7)
    shared = pairs[8][0]  # a prompt that gets two more answers, one of each label
    sequences = [*pairs, (shared, extra[0][1], []), (shared, extra[1][1], []), extra[2]]
    labels = [*pair_labels(pairs), True, False, True]
    scores = preference_scores(adapted, split_of(sequences, labels), False, CPU, micro_batch_size=4)
    with torch.no_grad():
        logps = paper_logps(adapted, sequences)
    couples = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (8, 11), (10, 9), (10, 11)]
    expected = sum(float(logps[good] > logps[bad]) for good, bad in couples) / len(couples)
    assert scores["preference_pairs"] == len(couples) and scores["preference_accuracy"] == pytest.approx(expected)
    good = torch.tensor(labels)
    lengths = torch.tensor([float(len(answer)) for _, answer, _ in sequences])
    per_token = logps / lengths
    assert scores["logp_margin"] == pytest.approx(float(per_token[good].mean() - per_token[~good].mean()), abs=1e-5)
    unpaired = [sequences[i] for i in (0, 3, 4, 7)]  # four prompts, each answered once
    alone = preference_scores(adapted, split_of(unpaired, [True, False, True, False]), False, CPU)
    assert "preference_accuracy" not in alone and "preference_pairs" not in alone


# ---------------------------------------------------------------- a planted preference, through the CLI

WORDS = ["red", "green", "blue", "yes", "no", "maybe", "hello", "world", "answer", "question", "reply"]


def planted_pairs(count: int = 80, seed: int = 0) -> list[dict]:
    """The chosen answer is always the short one (1-2 words), the rejected one 6-9 words."""
    generator = torch.Generator().manual_seed(seed)

    def words(low: int, high: int) -> str:
        n = int(torch.randint(low, high + 1, (1,), generator=generator))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=generator))

    return [{"prompt": f"Question {i}: say something {words(1, 1)}", "chosen": words(1, 2),
             "rejected": words(6, 9)} for i in range(count)]


def preference_run(cli, llama, path, run_dir, method: str, steps: int = 24):
    from helpers import fast_train_flags

    result = cli("finetune", "--model", llama, "--method", method, "--data.path", path, "--out_dir", run_dir,
                 "--data.val_split", 0.2, "--data.test_split", 0,
                 *fast_train_flags(max_steps=steps, batch=8, micro=8), "--train.eval_interval", steps // 2,
                 "--train.eval_iters", 4, "--train.learning_rate", 1e-2, "--train.lr_schedule", "constant",
                 "--lora.dropout", 0)
    assert result.code == 0, result.err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def test_dpo_learns_a_planted_preference(cli, llama, tmp_path):
    """80 pairs whose chosen answer is always the shorter: DPO on LoRA through `finetune` ends with
    every held-out pair preferred. At the first step policy and reference are the same weights, so
    every pair is a tie (margin 0, no pair counted as preferred) and the loss is log 2."""
    path = write_jsonl(tmp_path / "pairs.jsonl", planted_pairs())
    train, val = preference_run(cli, llama, path, tmp_path / "run", "dpo")
    assert [r["step"] for r in train] == list(range(1, 25)) and [r["step"] for r in val] == [12, 24]
    first = train[0]
    assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0
    assert first["loss"] == pytest.approx(math.log(2))
    assert val[-1]["val_reward_accuracy"] >= 0.9, val
    assert val[-1]["val_reward_margin"] > val[0]["val_reward_margin"] > 0.3, val
    assert val[-1]["val_loss"] < 0.6 * math.log(2)
    assert all(r["logp_chosen"] > r["logp_rejected"] for r in train[-5:])  # figures logged every step


def test_kto_trains_end_to_end_with_its_figures(cli, llama, tmp_path):
    """KTO rows (one answer, a label) from the same planted preference: the desirable answers' rewards
    pull away from the undesirable ones', and every figure is in metrics.jsonl."""
    rows = [{"prompt": pair["prompt"], "completion": pair["chosen" if i % 2 else "rejected"],
             "label": bool(i % 2)} for i, pair in enumerate(planted_pairs())]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    train, val = preference_run(cli, llama, path, tmp_path / "run", "kto")
    figures = {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
               "logp_rejected"}
    assert all(figures <= r.keys() for r in train)
    assert all({f"val_{k}" for k in figures | {"loss"}} <= r.keys() for r in val)
    assert train[0]["reward_margin"] == 0 and train[0]["loss"] == pytest.approx(0.5)  # 1 − σ(0), weights 1
    last = val[-1]
    assert last["val_reward_margin"] > 0.5 and last["val_reward_chosen"] > last["val_reward_rejected"]
    assert sum(r["loss"] for r in train[-6:]) / 6 < 0.47


# ---------------------------------------------------------------- preference data: layout, cleaning, errors

def prepared(cli, llama, path, run_dir, method: str, *flags):
    result = cli("prepare", "--model", llama, "--method", method, "--data.path", path, "--out_dir", run_dir,
                 "--data.val_split", 0, "--data.test_split", 0, *flags)
    assert result.code == 0, result.err
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    return TokenizedSplit.load(run_dir / "data" / "train"), manifest


def layout(split: TokenizedSplit, tokenizer, index: int) -> tuple[str, str]:
    """(the whole sequence, its supervised tokens) as text."""
    ids, supervised = split.example(index)
    return tokenizer.decode(ids), tokenizer.decode(ids[supervised])


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_pairs_are_chosen_then_rejected_with_only_the_answers_trained(cli, llama, tokenizer, tmp_path):
    """Strings, message lists (a multi-turn prompt) and UltraFeedback's whole conversations: chosen at
    2i, rejected at 2i+1, the same prompt tokens, only the answer (and its end-of-turn) trained; a pair
    whose answers are the same is counted under identical_pairs and dropped."""
    user = [{"role": "user", "content": "Name a colour"}]
    rows = [
        {"prompt": "What is red?", "chosen": "red is a colour", "rejected": "no"},  # strings
        {"prompt": [{"role": "user", "content": "hello"}, assistant("hello world"),
                    {"role": "user", "content": "and again?"}],  # a multi-turn prompt: its answer is context
         "chosen": [assistant("yes again")], "rejected": [assistant("maybe")]},
        {"prompt": "Name a colour", "chosen": [*user, assistant("green")],  # UltraFeedback: the whole
         "rejected": [*user, assistant("the quick fox")]},  # conversation on each side
        {"prompt": "Say yes", "chosen": "yes", "rejected": " yes "},  # the same answer: nothing to learn
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    split, manifest = prepared(cli, llama, path, tmp_path / "run", "dpo")
    assert manifest["cleaning"]["path"]["counts"]["identical_pairs"] == 1
    assert len(split) == 6 and split.labels.tolist() == [1, 0, 1, 0, 1, 0]
    answers = [("red is a colour", "no"), ("yes again", "maybe"), ("green", "the quick fox")]
    for i, (chosen, rejected) in enumerate(answers):
        chosen_text, chosen_trained = layout(split, tokenizer, 2 * i)
        rejected_text, rejected_trained = layout(split, tokenizer, 2 * i + 1)
        assert chosen_trained == f"{chosen}<|im_end|>" and rejected_trained == f"{rejected}<|im_end|>"
        prompt = chosen_text[: -len(chosen_trained)]
        assert prompt.endswith("<|im_start|>assistant\n") and rejected_text == prompt + rejected_trained
        assert prompt.count("<|im_start|>user") == (2 if i == 1 else 1)
    assert "hello world" in layout(split, tokenizer, 2)[0]  # the earlier answer is in the prompt, untrained


def test_hh_conversations_share_the_prompt_and_train_only_the_last_answer(cli, llama, tokenizer, tmp_path):
    """Anthropic HH: two whole multi-turn conversations (text, or message lists) that differ in the last
    answer; the earlier assistant turn is in the prompt but not trained."""
    dialogue = "\n\nHuman: hello\n\nAssistant: hello world\n\nHuman: What is red?\n\nAssistant:"
    messages = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "no"},
                {"role": "user", "content": "Say yes now"}]
    rows = [{"chosen": f"{dialogue} red is a colour", "rejected": f"{dialogue} blue"},
            {"chosen": [*messages, assistant("yes")], "rejected": [*messages, assistant("maybe no")]}]
    split, manifest = prepared(cli, llama, write_jsonl(tmp_path / "hh.jsonl", rows), tmp_path / "run", "dpo")
    assert manifest["format"]["train"] == "hh" and split.labels.tolist() == [1, 0, 1, 0]
    expected = ["red is a colour", "blue", "yes", "maybe no"]
    earlier = ["hello world", "hello world", "no", "no"]
    for index, (answer, context) in enumerate(zip(expected, earlier)):
        text, trained = layout(split, tokenizer, index)
        assert trained == f"{answer}<|im_end|>"  # the earlier assistant turn is not trained
        assert f"<|im_start|>assistant\n{context}<|im_end|>" in text
        assert text.count("<|im_start|>assistant") == 2
    assert layout(split, tokenizer, 0)[0][:-len("red is a colour<|im_end|>")] == \
        layout(split, tokenizer, 1)[0][:-len("blue<|im_end|>")]


def test_kto_rows_are_one_answer_each_with_their_label(cli, llama, tokenizer, tmp_path):
    rows = [{"prompt": "What is red?", "completion": "a colour", "label": True},
            {"prompt": "What is blue?", "completion": "a fox", "label": "undesirable"},
            {"prompt": "Say yes", "completion": "yes", "label": 1},
            {"prompt": "Say no", "completion": "maybe", "label": "bad"}]
    split, _ = prepared(cli, llama, write_jsonl(tmp_path / "kto.jsonl", rows), tmp_path / "run", "kto")
    assert split.labels.tolist() == [1, 0, 1, 0]
    for index, row in enumerate(rows):
        text, trained = layout(split, tokenizer, index)
        assert trained == f"{row['completion']}<|im_end|>" and row["prompt"] in text
    pairs = [{"prompt": "What is red?", "chosen": "a colour", "rejected": "a fox"}]  # kto on a pair: two
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    split, _ = prepared(cli, llama, path, tmp_path / "pairs-run", "kto")
    assert split.labels.tolist() == [1, 0]
    assert [layout(split, tokenizer, i)[1] for i in range(2)] == ["a colour<|im_end|>", "a fox<|im_end|>"]


def test_kto_reference_point_pairs_each_answer_with_another_prompts_answer(cli, llama, tmp_path):
    """z is estimated on mismatched pairs: answer i's prompt with the answer of another prompt. KTO on
    pair rows puts a pair's two answers side by side under one prompt, so the next row's answer is
    not a mismatch there: the partner is the next row whose prompt differs."""
    from tunesmith.train.preference import mismatched

    pairs = [{"prompt": f"What is {word}?", "chosen": f"{word} is a colour", "rejected": "no"}
             for word in ("red", "green", "blue")]
    split, _ = prepared(cli, llama, write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "run", "kto")
    rows = [split.example(i) for i in range(len(split))]
    prompts = [ids[: int(supervised.nonzero()[0])].tolist() for ids, supervised in rows]
    answers = [ids[int(supervised.nonzero()[0]):].tolist() for ids, supervised in rows]
    assert len(rows) == 6 and prompts[0] == prompts[1] != prompts[2]
    for i in range(len(rows)):
        joined, mask = mismatched(split, i, max_length=512)
        partner = (2 * (i // 2) + 2) % len(rows)  # the first row of the next pair: another prompt
        assert joined.tolist() == prompts[i] + answers[partner], i
        assert mask.tolist() == [False] * len(prompts[i]) + rows[partner][1][len(prompts[partner]):].tolist()
        assert joined.tolist() not in [ids.tolist() for ids, _ in rows]  # not a real row of the split


def one_error_line(result) -> str:
    errors = [line for line in result.err.splitlines() if line.startswith("tunesmith:")]
    assert result.code == 2 and len(errors) == 1 and "Traceback" not in result.err, result.err
    return errors[0]


@pytest.mark.parametrize("problem", ["empty", "missing"])
def test_an_empty_or_missing_side_is_an_error_naming_the_line_or_is_dropped(cli, llama, tmp_path, problem):
    """With data.clean.drop_empty false: exit 2, one line naming file:line, no run directory; with the
    default the row is counted under empty_fields and left out."""
    rows = [{"prompt": "What is red?", "chosen": "a colour", "rejected": "a fox"},
            {"prompt": "Say yes", "chosen": "yes", "rejected": "no"},
            {"prompt": "What is blue?", "chosen": "a colour", "rejected": "  "} if problem == "empty" else
            {"prompt": "What is blue?", "chosen": "a colour"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", llama, "--method", "dpo", "--data.path", path, "--out_dir", run_dir,
                 "--data.clean.drop_empty", "false")
    line = one_error_line(result)
    assert f"{path}:3: field 'rejected' is" in line, line
    assert not run_dir.exists()
    split, manifest = prepared(cli, llama, path, run_dir, "dpo")  # drop_empty (the default): counted, dropped
    assert manifest["cleaning"]["path"]["counts"]["empty_fields"] == 1 and len(split) == 4


MISFITS = {  # method: (a row it cannot train on, what the error says)
    "dpo": ({"prompt": "What is {i}?", "completion": "a colour", "label": True}, "method=dpo needs pairs"),
    "lora": ({"prompt": "What is {i}?", "chosen": "a colour", "rejected": "a fox"}, "has preference rows"),
    "kto": ({"question": "What is {i}?", "answer": "a colour"}, "method=kto needs prompt/completion/label"),
}


@pytest.mark.parametrize("method", list(MISFITS))
def test_rows_the_method_cannot_train_are_refused_before_anything_is_written(cli, llama, tmp_path, method):
    row, message = MISFITS[method]
    rows = [{key: value.format(i=i) if isinstance(value, str) else value for key, value in row.items()}
            for i in range(4)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", llama, "--method", method, "--data.path", path, "--out_dir", run_dir)
    line = one_error_line(result)
    assert str(path) in line and message in line, line
    assert not run_dir.exists()


def test_init_from_starts_and_refers_to_the_finished_run(cli, llama, tmp_path):
    """DPO from a supervised run: the run's adapter is merged into its base once (init-model), the new
    run's model is that merged model, and at step 1 the policy equals the reference (loss log 2, margin
    0). Had the raw base been the reference, the merged SFT update would make the first margin non-zero."""
    from helpers import fast_train_flags, qa_rows
    from safetensors.torch import load_file

    sft = tmp_path / "sft"
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24))
    result = cli("finetune", "--model", llama, "--data.path", data, "--out_dir", sft,
                 *fast_train_flags(max_steps=4, batch=4, micro=4), "--train.learning_rate", 5e-2)
    assert result.code == 0, result.err
    path = write_jsonl(tmp_path / "pairs.jsonl", planted_pairs(40))
    run = tmp_path / "dpo"
    result = cli("finetune", "--model", llama, "--method", "dpo", "--init_from", sft, "--data.path", path,
                 "--out_dir", run, *fast_train_flags(max_steps=2, batch=8, micro=8), "--lora.dropout", 0)
    assert result.code == 0, result.err
    merged = run / "init-model"
    assert json.loads((merged / "merge_info.json").read_text())["source"] == str((sft / "best").resolve())
    base = load_file(str(next(llama.glob("*.safetensors"))))
    tuned = load_file(str(next(merged.glob("*.safetensors"))))
    assert any(not torch.equal(tuned[k], base[k]) for k in base if k in tuned)  # the SFT update is in it
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == str(merged) and saved["init_from"] == str(sft)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reward_margin"] == 0 and first["loss"] == pytest.approx(math.log(2))
