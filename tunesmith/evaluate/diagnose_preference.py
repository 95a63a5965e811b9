"""What the preference figures of a run (dpo, orpo, simpo, kto) say, beyond its loss curve.

    both likelihoods fell  the chosen answers' log-prob fell along with the rejected ones': the
                           model moves away from both (a known DPO failure; generations degrade)
    accuracy saturated     preference accuracy reached ~100% early: later steps only widen margins
    margin still rising    the reward margin was still climbing when training stopped
    validation accuracy    held-out accuracy well under the training accuracy: pairs memorised
"""

from __future__ import annotations

SATURATED = 0.98  # accuracy at or above this is saturated
CHOSEN_DROP = 0.5  # nats per token: the chosen answers' mean log-prob fell by more than this
STILL_RISING = 0.25  # the margin rose by more than this share of its total rise over the last fifth
ACCURACY_GAP = 0.15  # training accuracy this far above validation accuracy


def preference_findings(records: list[dict]) -> tuple[list[str], list[str]]:
    train = [r for r in records if "reward_accuracy" in r and "loss" in r]
    val = [r for r in records if "val_reward_accuracy" in r]
    if len(train) < 4:  # as for the loss curve: too few points to judge a shape
        return [], []
    findings, advice = [], []
    for check in (_both_fell, _saturated, _margin_rising, _memorised):
        found = check(train, val)
        if found:
            findings.append(found[0])
            advice += found[1:]
    return findings, advice


def _both_fell(train, val):
    first, last = train[0], train[-1]
    chosen_fall = first["logp_chosen"] - last["logp_chosen"]
    if chosen_fall <= CHOSEN_DROP or last["logp_rejected"] >= first["logp_rejected"]:
        return None
    return (f"Both likelihoods fell: the chosen answers' mean log-prob went from {first['logp_chosen']:.2f} to "
            f"{last['logp_chosen']:.2f} per token (rejected {first['logp_rejected']:.2f} -> "
            f"{last['logp_rejected']:.2f}). The margin grows by pushing both down, a known DPO failure that "
            "makes generations worse.",
            "lower train.learning_rate or raise preference.beta; or use method orpo (it keeps learning the "
            "chosen answers), or start from a supervised run on the chosen answers (init_from)")


def _saturated(train, val):
    accuracy = [r["reward_accuracy"] for r in train]
    hits = [r["step"] for r in train if r["reward_accuracy"] >= SATURATED]
    if not hits or min(accuracy[len(accuracy) // 2:]) < SATURATED:
        return None
    held_out = f"; validation {100 * val[-1]['val_reward_accuracy']:.0f}%" if val else ""
    return (f"Preference accuracy saturated: {100 * accuracy[-1]:.0f}% on training pairs from step {hits[0]} "
            f"on{held_out}. Later steps only widen the margin (reward margin {train[-1]['reward_margin']:.2f}).",
            "fewer steps would do (train.max_steps), or harder pairs would teach more")


def _margin_rising(train, val):
    if train[-1]["reward_accuracy"] >= SATURATED:
        return None  # every pair already ranked right: a growing margin is expected, not unfinished work
    margins = [r["reward_margin"] for r in train]
    rise = margins[-1] - margins[0]
    tail = margins[-max(2, len(margins) // 5):]
    if rise <= 0 or tail[-1] - tail[0] <= STILL_RISING * rise:
        return None
    return (f"The reward margin was still rising at the end ({tail[0]:.2f} -> {tail[-1]:.2f} over the last "
            f"{len(tail)} logged points).", "train longer (train.max_steps or train.epochs) if validation "
            "accuracy is still improving")


def _memorised(train, val):
    if not val:
        return None
    gap = train[-1]["reward_accuracy"] - val[-1]["val_reward_accuracy"]
    if gap < ACCURACY_GAP:
        return None
    return (f"Validation preference accuracy ({100 * val[-1]['val_reward_accuracy']:.0f}%) is well under the "
            f"training accuracy ({100 * train[-1]['reward_accuracy']:.0f}%): the pairs are being memorised.",
            "more pairs, fewer epochs, or a lower learning rate")
