"""Policy and value losses: pure functions of tensors, registered by name, each returning
(loss, metrics) with namespaced metric keys. Losses are token means over the valid response
tokens of the batch they are given (the learner weights micro-batches to keep that exact).

Legend: `B` batch, `A` response tokens (padded).
"""

from __future__ import annotations

from enum import Enum

import torch

from services.trainer.algorithms.masked import masked_mean
from services.trainer.algorithms.registry import Registry


class PolicyLossName(str, Enum):
    PPO_CLIP = "ppo_clip"


class ValueLossName(str, Enum):
    CLIPPED_MSE = "clipped_mse"


POLICY_LOSSES: Registry = Registry("policy loss", PolicyLossName)
VALUE_LOSSES: Registry = Registry("value loss", ValueLossName)


@POLICY_LOSSES.register(PolicyLossName.PPO_CLIP)
def ppo_clip_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), all inputs (B, A).

        ratio = pi(a|s) / pi_behaviour(a|s)   (behaviour = the policy that generated the sample)
        loss  = token mean of max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))

    Asymmetric ranges (clip_high > clip_low) are DAPO's "clip higher".
    """
    log_ratio = logprobs - behaviour_logprobs  # (B, A)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        metrics = {
            "policy/loss": float(loss),
            "policy/clipfrac": float(
                masked_mean((clipped > unclipped).to(logprobs.dtype), response_mask)
            ),
            # k1 estimate of KL(behaviour || current) from the behaviour's samples.
            "policy/approx_kl": float(masked_mean(-log_ratio, response_mask)),
            "policy/ratio_mean": float(masked_mean(ratio, response_mask)),
        }
    return loss, metrics


@VALUE_LOSSES.register(ValueLossName.CLIPPED_MSE)
def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's value loss with value clipping, all inputs (B, A):

    0.5 * mean over valid tokens of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), response_mask)
    with torch.no_grad():
        metrics = {
            "value/loss": float(loss),
            "value/clipfrac": float(
                masked_mean((clipped_loss > unclipped_loss).to(values.dtype), response_mask)
            ),
            "value/mean": float(masked_mean(values, response_mask)),
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution of each position: (..., V) -> (...)."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(dim=-1)
