"""Preference tuning: DPO (with its IPO and hinge variants), ORPO, SimPO and KTO on the packed loop.

A micro batch packs the chosen and rejected answers of several pairs (or several KTO answers)
into one row with per-example attention; log-probabilities are computed only at answer tokens,
one chunk of logits at a time. Where the per-example attention runs, a pair's prompt is held once
and both its answers attend to it (train/batching.py's pack_groups). Each sequence's log-probability is the sum over its answer
tokens (`logps`), its length the number of those tokens (`counts`).

The reference model of DPO and KTO is the starting point of the run: for adapter methods the
same model with the adapter switched off (no second copy in memory); for full fine-tunes its
log-probabilities are computed once before the first step and kept with the prepared data.

Losses per pair, with h = β·((π_c − ref_c) − (π_r − ref_r)) and a = the mean token log-prob:
    dpo sigmoid  −(1−ε)·log σ(h) − ε·log σ(−h)           (Rafailov et al. 2023; ε label smoothing)
    dpo ipo      (h/β − 1/(2β))²                         (Azar et al. 2023)
    dpo hinge    max(0, 1 − h)                           (SLiC)
    orpo         −a_c − β·log σ(log odds(a_c) − log odds(a_r)),  odds(a) = e^a / (1 − e^a)  (Hong et al. 2024)
    simpo        −log σ(β·(a_c − a_r) − γ)                (Meng et al. 2024)
    kto          w_D·(1 − σ(β·(r − z))) for desirable, w_U·(1 − σ(β·(z − r))) for undesirable,
                 r = π − ref, z = max(0, mean of π − ref over mismatched prompt/answer pairs)  (Ethayarajh et al. 2024)
The step's loss is the mean over its pairs (KTO: its answers) across all micro batches and ranks.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.config import PAIRED_METHODS
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.batching import PackedBatch, pack_groups, pack_sequences
from tunesmith.train.distributed import Group, accumulating
from tunesmith.train.kernels import packed_attention
from tunesmith.train.loss import inner, token_logps, unwrap

WITH_REFERENCE = ("dpo", "kto")
FIGURES = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")


@dataclass(frozen=True)
class Settings:
    method: str  # dpo | orpo | simpo | kto
    beta: float
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    gamma: float = 0.5  # simpo margin
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def of(cls, config) -> Settings:
        p = config.preference
        return cls(config.method, config.beta, p.loss_type, p.label_smoothing, p.gamma, p.desirable_weight,
                   p.undesirable_weight)

    @property
    def paired(self) -> bool:
        return self.method in PAIRED_METHODS

    @property
    def uses_reference(self) -> bool:
        return self.method in WITH_REFERENCE


# ---- the losses, from sequence log-probabilities (pure functions; tests check them against the papers)

def pair_losses(s: Settings, chosen: torch.Tensor, rejected: torch.Tensor, chosen_count: torch.Tensor,
                rejected_count: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                ref_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair (n,): the loss, and the implicit rewards of chosen and rejected."""
    if s.method == "dpo":
        reward_c, reward_r = s.beta * (chosen - ref_chosen), s.beta * (rejected - ref_rejected)
        h = reward_c - reward_r
        if s.loss_type == "ipo":
            loss = (h / s.beta - 1 / (2 * s.beta)) ** 2
        elif s.loss_type == "hinge":
            loss = torch.relu(1 - h)
        else:
            loss = -(1 - s.label_smoothing) * F.logsigmoid(h) - s.label_smoothing * F.logsigmoid(-h)
        return loss, reward_c, reward_r
    mean_c, mean_r = chosen / chosen_count, rejected / rejected_count
    reward_c, reward_r = s.beta * mean_c, s.beta * mean_r
    if s.method == "orpo":
        log_odds = (mean_c - mean_r) - (_log1m_exp(mean_c) - _log1m_exp(mean_r))
        return -mean_c - s.beta * F.logsigmoid(log_odds), reward_c, reward_r
    if s.method == "simpo":
        return -F.logsigmoid(reward_c - reward_r - s.gamma), reward_c, reward_r
    raise ValueError(f"not a paired method: {s.method}")


def _log1m_exp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a < 0, stable near 0."""
    a = a.clamp(max=-1e-6)
    return torch.where(a > -0.693, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def kto_losses(s: Settings, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer (n,): the loss and the reward β·(π − ref); kl is the (detached) reference point z."""
    reward = logps - ref_logps
    loss = torch.where(desirable, s.desirable_weight * (1 - torch.sigmoid(s.beta * (reward - kl))),
                       s.undesirable_weight * (1 - torch.sigmoid(s.beta * (kl - reward))))
    return loss, s.beta * reward


# ---- batches

@dataclass
class PreferenceBatch:
    packed: PackedBatch  # every sequence of the micro batch end to end (pairs: chosen, rejected, chosen, ...)
    desirable: torch.Tensor  # (n_sequences,) bool: chosen / desirable
    reference: torch.Tensor | None  # (n_sequences,) precomputed reference log-probs (full fine-tunes)
    kl: PackedBatch | None = None  # kto: each answer's prompt with another row's answer
    kl_reference: torch.Tensor | None = None
    units: int = 0  # pairs (or KTO answers) in this micro batch

    @property
    def n_tokens(self) -> int:
        return self.packed.n_tokens

    @property
    def n_computed(self) -> int:
        return self.packed.n_computed

    @property
    def n_targets(self) -> int:
        return self.packed.n_targets

    @property
    def segments(self) -> list[tuple[int, int]]:
        return self.packed.segments

    @property
    def context_lengths(self) -> list[int]:
        return self.packed.context_lengths


def pack_units(paired: bool, sequences: list[tuple[torch.Tensor, torch.Tensor]], share_prefix: bool) -> PackedBatch:
    """Sequences in one row, pairs (chosen, rejected) whole when paired: with share_prefix, each
    pair's prompt once, both of its answers attending to it (KTO's answers: their common beginning,
    as for SFT)."""
    if paired:
        return pack_groups([sequences[i:i + 2] for i in range(0, len(sequences), 2)], share_prefix)
    return pack_sequences(sequences, share_prefix)


def sequence_ids(settings: Settings, indices: list[int]) -> list[int]:
    """The split's sequences of these units: a pair i is sequences 2i (chosen) and 2i+1 (rejected)."""
    if settings.paired:
        return [j for i in indices for j in (2 * i, 2 * i + 1)]
    return list(indices)


def mismatched(split: TokenizedSplit, index: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's KL term: the prompt of answer `index` followed by the answer of the next row with another
    prompt (ids, supervised). KTO on pairs puts a pair's two answers side by side under one prompt: the
    next row there is that prompt's own other answer, a matched pair rather than a mismatched one."""
    ids, supervised = split.example(index)
    prompt_end = _answer_start(supervised, len(ids))
    other_ids, other_supervised = split.example(_next_other_prompt(split, index, ids[:prompt_end]))
    answer_start = _answer_start(other_supervised, 0)
    joined = torch.cat([ids[:prompt_end], other_ids[answer_start:]])[:max_length]
    mask = torch.cat([torch.zeros(prompt_end, dtype=torch.bool), other_supervised[answer_start:]])[:max_length]
    return joined, mask


def _answer_start(supervised: torch.Tensor, default: int) -> int:
    return int(supervised.nonzero()[0]) if supervised.any() else default


def _next_other_prompt(split: TokenizedSplit, index: int, prompt: torch.Tensor, look_ahead=16) -> int:
    """The first row after `index` (cyclically, within look_ahead rows) whose prompt is not `prompt`;
    the next row if there is none."""
    for step in range(1, min(len(split), look_ahead + 1)):
        other_ids, other_supervised = split.example((index + step) % len(split))
        if not torch.equal(other_ids[: _answer_start(other_supervised, len(other_ids))], prompt):
            return (index + step) % len(split)
    return (index + 1) % len(split)


def sequence_logps(model, batch: PackedBatch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer-token log-probs and answer-token counts of every sequence in a packed batch: (n,), (n,)."""
    per_token = token_logps(model, batch, chunk_size)  # (n_targets,)
    starts = torch.tensor([start for start, _ in batch.example_segments], device=per_token.device)
    which = torch.searchsorted(starts, batch.predict_at, right=True) - 1  # (n_targets,) sequence of each target
    n = len(batch.example_segments)
    sums = per_token.new_zeros(n).index_add(0, which, per_token)
    counts = torch.bincount(which, minlength=n).to(per_token.dtype)
    return sums, counts


@contextmanager
def adapter_off(model):
    """The reference model of an adapter run: the same weights with the adapter switched off."""
    with inner(model).disable_adapter():  # PEFT's switch; the wrapped modules skip their adapter inside it
        yield


# ---- the objective

class Preference:
    """train/objective.py's interface for the preference methods."""

    def __init__(self, settings: Settings, splits: dict[str, TokenizedSplit], train_cfg, device, autocast,
                 max_length: int, group: Group = Group(), references: dict[str, torch.Tensor] | None = None,
                 share_prefix: bool = False):
        self.settings, self.splits, self.train_cfg = settings, splits, train_cfg
        self.share_prefix = share_prefix  # a micro batch's common beginning computed once (train/batching.py)
        self.device, self.autocast, self.max_length, self.group = device, autocast, max_length, group
        self.references = references  # None: the adapter switched off is the reference

    def units(self, split: str) -> int:
        size = len(self.splits[split])
        return size // 2 if self.settings.paired else size

    def batch(self, split: str, indices: list[int]) -> PreferenceBatch:
        data, ids = self.splits[split], sequence_ids(self.settings, indices)
        packed = pack_units(self.settings.paired, [data.example(i) for i in ids], self.share_prefix).to(self.device)
        desirable = data.labels[ids].bool().to(self.device)
        reference = self.references[split][ids].to(self.device) if self.references is not None else None
        batch = PreferenceBatch(packed, desirable, reference, units=len(indices))
        if self.settings.method == "kto":
            batch.kl = pack_sequences([mismatched(data, i, self.max_length) for i in ids],
                                      self.share_prefix).to(self.device)
            if self.references is not None:
                batch.kl_reference = self.references[f"{split}_kl"][ids].to(self.device)
        return batch

    def step(self, model, batches: list[PreferenceBatch]) -> tuple[torch.Tensor, dict]:
        units = self.group.sum(torch.tensor(float(sum(b.units for b in batches)), device=self.device))
        kl = self._kl(model, batches) if self.settings.method == "kto" else None
        loss_total = torch.zeros((), device=self.device)
        sums = Figures(self.device)
        for i, batch in enumerate(batches):
            reference = self._reference(model, batch.packed, batch.reference)
            with accumulating(model, i < len(batches) - 1), packed_attention(unwrap(model)):
                with self.autocast:
                    logps, counts = sequence_logps(model, batch.packed, self.train_cfg.loss_chunk_size)
                losses = self._losses(logps, counts, reference, batch.desirable, kl, sums)
                (losses.sum() / units).backward()
            loss_total += losses.detach().sum()
        return self.group.sum(loss_total) / units, sums.means(self.group)

    @torch.no_grad()
    def validate(self, model) -> dict:
        split, size = "val", self.train_cfg.micro_batch_size
        total = min(self.units(split), size * self.train_cfg.eval_iters)
        if total == 0:
            return {}
        model.eval()
        batches = [self.batch(split, list(range(start, min(start + size, total)))) for start in range(0, total, size)]
        kl = self._kl(model, batches) if self.settings.method == "kto" else None
        loss_total, sums = 0.0, Figures(self.device)
        for batch in batches:
            reference = self._reference(model, batch.packed, batch.reference)
            with packed_attention(unwrap(model)), self.autocast:
                logps, counts = sequence_logps(model, batch.packed, self.train_cfg.loss_chunk_size)
            loss_total += float(self._losses(logps, counts, reference, batch.desirable, kl, sums).sum())
        model.train()
        return {"val_loss": loss_total / total, **{f"val_{k}": float(v) for k, v in sums.means().items()}}

    def _losses(self, logps, counts, reference, desirable, kl, sums: Figures) -> torch.Tensor:
        s = self.settings
        if s.method == "kto":
            losses, rewards = kto_losses(s, logps, reference, desirable, kl)
            sums.add_answers(rewards.detach(), (logps / counts).detach(), desirable, s.beta * kl)
            return losses
        ref_c, ref_r = (reference[0::2], reference[1::2]) if reference is not None else (None, None)
        losses, reward_c, reward_r = pair_losses(s, logps[0::2], logps[1::2], counts[0::2], counts[1::2],
                                                 ref_c, ref_r)
        mean = (logps / counts).detach()
        sums.add_pairs(reward_c.detach(), reward_r.detach(), mean[0::2], mean[1::2])
        return losses

    @torch.no_grad()
    def _reference(self, model, packed: PackedBatch, stored: torch.Tensor | None) -> torch.Tensor | None:
        if not self.settings.uses_reference or stored is not None:
            return stored
        with adapter_off(model), packed_attention(unwrap(model)), self.autocast:
            return sequence_logps(model, packed, self.train_cfg.loss_chunk_size)[0]

    @torch.no_grad()
    def _kl(self, model, batches: list[PreferenceBatch]) -> torch.Tensor:
        """KTO's reference point z over the whole step: mean of π − ref on mismatched pairs, ≥ 0, no gradient."""
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for batch in batches:
            with packed_attention(unwrap(model)), self.autocast:
                policy = sequence_logps(model, batch.kl, self.train_cfg.loss_chunk_size)[0]
            reference = self._reference(model, batch.kl, batch.kl_reference)
            total += (policy - reference).sum()
            count += policy.shape[0]
        return (self.group.sum(total) / self.group.sum(count)).clamp(min=0)


class Figures:
    """Running sums of the rewards, margins, accuracy and mean log-probs a step (or validation) reports."""

    def __init__(self, device):
        self.sums = {key: torch.zeros((), device=device) for key in FIGURES}
        self.chosen, self.rejected, self.pairs = (torch.zeros((), device=device) for _ in range(3))

    def add_pairs(self, reward_c, reward_r, logp_c, logp_r) -> None:
        self.sums["reward_chosen"] += reward_c.sum()
        self.sums["reward_rejected"] += reward_r.sum()
        self.sums["reward_margin"] += (reward_c - reward_r).sum()
        self.sums["reward_accuracy"] += (reward_c > reward_r).float().sum()
        self.sums["logp_chosen"] += logp_c.sum()
        self.sums["logp_rejected"] += logp_r.sum()
        self.chosen += reward_c.shape[0]
        self.rejected += reward_r.shape[0]
        self.pairs += reward_c.shape[0]

    def add_answers(self, reward, logp, desirable, kl) -> None:
        """KTO: chosen means desirable; accuracy is the share of answers on their label's side of z."""
        bad = ~desirable
        self.sums["reward_chosen"] += reward[desirable].sum()
        self.sums["reward_rejected"] += reward[bad].sum()
        self.sums["reward_accuracy"] += torch.where(desirable, reward > kl, reward < kl).float().sum()
        self.sums["logp_chosen"] += logp[desirable].sum()
        self.sums["logp_rejected"] += logp[bad].sum()
        self.chosen += desirable.sum()
        self.rejected += bad.sum()
        self.pairs += reward.shape[0]

    def means(self, group: Group = Group()) -> dict:
        totals = {key: group.sum(value) for key, value in self.sums.items()}
        chosen, rejected, pairs = (group.sum(x).clamp(min=1) for x in (self.chosen, self.rejected, self.pairs))
        out = {"reward_chosen": totals["reward_chosen"] / chosen, "reward_rejected": totals["reward_rejected"] / rejected,
               "reward_accuracy": totals["reward_accuracy"] / pairs, "logp_chosen": totals["logp_chosen"] / chosen,
               "logp_rejected": totals["logp_rejected"] / rejected}
        out["reward_margin"] = out["reward_chosen"] - out["reward_rejected"]
        return out


# ---- full fine-tunes: the reference log-probs, computed once and kept with the prepared data

@torch.no_grad()
def compute_references(model, objective: Preference, splits: list[str]) -> dict[str, torch.Tensor]:
    """Sequence log-probs of the starting model for every sequence (and KTO mismatched pair) of the splits."""
    model.eval()
    out = {}
    for split in splits:
        data = objective.splits[split]
        sequences = {split: [data.example(i) for i in range(len(data))]}
        if objective.settings.method == "kto":
            sequences[f"{split}_kl"] = [mismatched(data, i, objective.max_length) for i in range(len(data))]
        for key, rows in sequences.items():
            paired = objective.settings.paired
            values, size = [], objective.train_cfg.micro_batch_size * (2 if paired else 1)  # a training micro batch
            for start in range(0, len(rows), size):
                packed = pack_units(paired, rows[start: start + size], objective.share_prefix).to(objective.device)
                with packed_attention(unwrap(model)), objective.autocast:
                    values.append(sequence_logps(model, packed, objective.train_cfg.loss_chunk_size)[0].float().cpu())
            out[key] = torch.cat(values) if values else torch.zeros(0)
    model.train()
    return out


def load_or_compute_references(model, objective: Preference, folder, manifest_key: dict) -> dict[str, torch.Tensor]:
    """<run>/data/reference_logps.safetensors, made on the first start and reused on resume (it belongs to
    the prepared data: a new preparation removes it)."""
    from safetensors.torch import load_file, save_file

    from tunesmith.locks import exclusive
    from tunesmith.log import say

    path = folder / "reference_logps.safetensors"
    key = json.dumps(manifest_key, sort_keys=True)
    with exclusive(folder / "reference"):
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                if (handle.metadata() or {}).get("key") == key:
                    return load_file(str(path))
        say("Computing the reference model's log-probabilities once (full fine-tune: the starting weights "
            "are the reference)")
        references = compute_references(model, objective, ["train", "val", "test"])
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in references.items()}, str(tmp), metadata={"key": key})
        tmp.replace(path)
        return references


def objective_for(config, splits, device, autocast, group: Group = Group(), share_prefix: bool = False) -> Preference:
    return Preference(Settings.of(config), splits, config.train, device, autocast, config.data.max_seq_length, group,
                      share_prefix=share_prefix)
