"""Advantage estimators: GAE for PPO's critic, and the critic-free group baselines of GRPO and
RLOO. Each is a pure function of tensors registered under an `AdvantageEstimator` name and
called with the same keyword arguments (an estimator ignores what it does not use):

    advantages, returns = ADVANTAGE_ESTIMATORS.get(name)(
        token_level_rewards=..., response_mask=..., values=..., group_index=..., gamma=..., lam=...)

Outcome estimators (GRPO, RLOO) score a sequence by the sum of its token-level rewards (the
reward model's score, minus the KL penalty when KL is in the reward) and give every valid token
of the sequence the same advantage. A group of one sample has no baseline: its advantage is 0.

Legend: `B` batch, `A` response tokens (padded), `G` number of groups in the batch.
"""

from __future__ import annotations

from enum import Enum

import torch

from services.trainer.algorithms.registry import Registry


class AdvantageEstimator(str, Enum):
    GAE = "gae"
    GRPO = "grpo"
    RLOO = "rloo"


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator", AdvantageEstimator)


@ADVANTAGE_ESTIMATORS.register(AdvantageEstimator.GAE)
def gae_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None,
    gamma: float = 1.0,
    lam: float = 0.95,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the valid tokens.

        delta_t = r_t + gamma * V(t+1) - V(t),   A_t = delta_t + gamma * lam * A_(t+1)

    where t+1 is the next VALID token (masked tokens are skipped, so a mask with holes works)
    and V after the last valid token is 0. rewards, values, mask (B, A) -> advantages, returns
    (B, A) with returns = advantages + values; both are 0 on padding. `values=None` means a
    zero baseline (discounted reward-to-go, lam-weighted).
    """
    if values is None:
        values = torch.zeros_like(token_level_rewards)
    mask = response_mask.to(token_level_rewards.dtype)
    rewards, values = token_level_rewards * mask, values.to(token_level_rewards.dtype) * mask
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) value of the next valid token
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages = torch.zeros_like(rewards)  # (B, A)
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * valid
        # Padding leaves the running quantities as they were.
        next_value = valid * values[:, t] + (1 - valid) * next_value
        next_advantage = valid * advantage + (1 - valid) * next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


def _group_scores(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, group_index: torch.Tensor
):
    if group_index is None:
        raise ValueError("outcome advantages need group_index: the group (prompt) of every sample")
    scores = (token_level_rewards * response_mask).sum(dim=-1)  # (B,)
    _, inverse = torch.unique(group_index, return_inverse=True)  # (B,) in 0..G-1
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores)
    )  # (G,)
    sums = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, scores
    )  # (G,)
    return scores, inverse, counts, sums


@ADVANTAGE_ESTIMATORS.register(AdvantageEstimator.GRPO)
def grpo_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): A_i = (s_i - mean(group)) / (std(group) + eps), std unbiased.

    `norm_by_std=False` gives Dr. GRPO's mean-only baseline. rewards, mask (B, A), group_index
    (B,) -> advantages, returns (B, A), equal, broadcast over the valid tokens.
    """
    scores, inverse, counts, sums = _group_scores(token_level_rewards, response_mask, group_index)
    mean = (sums / counts)[inverse]  # (B,)
    centred = scores - mean  # (B,)
    if norm_by_std:
        sq = torch.zeros_like(sums).index_add_(0, inverse, centred**2)  # (G,)
        std = torch.sqrt(sq / (counts - 1).clamp(min=1.0))[inverse]  # (B,)
        centred = centred / (std + eps)
    advantages = torch.where(counts[inverse] > 1, centred, torch.zeros_like(centred))  # (B,)
    advantages = advantages[:, None] * response_mask  # (B, A)
    return advantages, advantages.clone()


@ADVANTAGE_ESTIMATORS.register(AdvantageEstimator.RLOO)
def rloo_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: torch.Tensor,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): A_i = s_i - mean of the OTHER samples of its group.

    rewards, mask (B, A), group_index (B,) -> advantages, returns (B, A), equal.
    """
    scores, inverse, counts, sums = _group_scores(token_level_rewards, response_mask, group_index)
    n = counts[inverse]  # (B,)
    baseline = (sums[inverse] - scores) / (n - 1).clamp(min=1.0)  # (B,)
    advantages = torch.where(n > 1, scores - baseline, torch.zeros_like(scores))  # (B,)
    advantages = advantages[:, None] * response_mask  # (B, A)
    return advantages, advantages.clone()
