"""Reward-hacking guards as pure functions of tensors: what the learner does to the reward
model's scores before they become advantages, and how it measures drift from the reference for
the hard KL budget.

1. `shaped_scores`: score - k * spread (the ensemble's disagreement: an answer the reward
   models disagree on is worth less, so the policy is not paid for exploiting one member's
   blind spot), then optionally divided by the response's token count (`length_normalise`),
   then minus `length_penalty` * tokens. Off (k = 0, no length control) it returns the scores
   unchanged, bit for bit.
2. `length_reward_correlation`: Pearson correlation of response length and the raw score in one
   batch; a reward model that pays for length shows it rising.
3. `token_mean_kl`: the per-token KL of the policy to the reference, mean over every response
   token of the batch, with one of the registered estimators; the learner compares it with
   `kl_budget` after a step and undoes a step that went over.

Legend: `B` batch, `A` response tokens (padded).
Tests: tests/unit/trainer/test_guards.py.
"""

from __future__ import annotations

import torch

from services.trainer.algorithms.kl import KL_ESTIMATORS, KLEstimator
from services.trainer.algorithms.masked import masked_sum


def shaped_scores(
    scores: torch.Tensor,
    spreads: torch.Tensor,
    lengths: torch.Tensor,
    *,
    uncertainty_penalty: float = 0.0,
    length_penalty: float = 0.0,
    length_normalise: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The score the learner optimises. scores, spreads, lengths (B,) -> shaped (B,), metrics.

    `length_normalise` divides by the token count (a per-token reward): with a reward model
    whose scores are negative that favours LONGER answers, so use `length_penalty` there.
    """
    shaped = scores
    if uncertainty_penalty:
        shaped = shaped - uncertainty_penalty * spreads
    if length_normalise:
        shaped = shaped / lengths.clamp(min=1).to(shaped.dtype)
    if length_penalty:
        shaped = shaped - length_penalty * lengths.to(shaped.dtype)
    metrics = {
        "reward/spread_mean": float(spreads.mean()),
        "reward/shaped_mean": float(shaped.mean()),
    }
    return shaped, metrics


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (B,) tensors; 0.0 where it is undefined (a constant input or
    fewer than two samples), so that the metric stays finite."""
    x, y = x.double(), y.double()
    if x.numel() < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((dx * dx).sum() * (dy * dy).sum())
    if not float(denominator) > 0:
        return 0.0
    return float((dx * dy).sum() / denominator)


def length_reward_correlation(lengths: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """`reward/length_corr`: Pearson(response tokens, reward-model score) over the batch."""
    return {"reward/length_corr": pearson(lengths.float(), scores)}


def token_mean_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str | KLEstimator = KLEstimator.K3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token KL over the batch's response tokens, number of tokens), as 0-d
    tensors, so that ranks can add both before dividing. Inputs (B, A)."""
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)  # (B, A)
    return masked_sum(kl, response_mask), response_mask.sum()
