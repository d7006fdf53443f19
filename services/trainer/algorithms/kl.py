"""KL between the policy and the frozen reference: per-token estimators, the two ways of
applying it (a penalty folded into the reward, or a term of the loss) and the coefficient
controllers (fixed, or adaptive towards a target KL as in Ziegler et al. 2019).

Estimators (Schulman, "Approximating KL divergence"), per token, with p the policy and q the
reference, evaluated on tokens sampled from p, log_ratio = log p - log q:
    k1 = log_ratio                              unbiased, high variance, can be negative
    k2 = 0.5 * log_ratio**2                     biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio        unbiased, low variance, >= 0

Legend: `B` batch, `A` response tokens (padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from services.trainer.algorithms.masked import last_token_index, masked_mean, masked_sum
from services.trainer.algorithms.registry import Registry

# exp(20) ~ 5e8: far beyond any useful k3 value, but finite (a policy token the reference
# thinks impossible must not turn the whole loss into inf).
_K3_MAX_EXPONENT = 20.0


class KLEstimator(str, Enum):
    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


class KLMode(str, Enum):
    REWARD = "reward"  # -coef * KL per token added to the reward (PPO, RLOO classic)
    LOSS = "loss"  # coef * KL added to the loss (GRPO)
    NONE = "none"


class KLControl(str, Enum):
    FIXED = "fixed"
    ADAPTIVE = "adaptive"


KL_ESTIMATORS: Registry = Registry("KL estimator", KLEstimator)
KL_CONTROLLERS: Registry = Registry("KL controller", KLControl)

# (reward multiplier, loss multiplier) applied to the coefficient for each placement.
KL_PLACEMENT: dict[KLMode, tuple[float, float]] = {
    KLMode.REWARD: (1.0, 0.0),
    KLMode.LOSS: (0.0, 1.0),
    KLMode.NONE: (0.0, 0.0),
}

# The estimator each placement uses unless configured: k1 in the reward (its sum over a
# sequence is the sequence log-ratio, Ziegler et al.), k3 in the loss (non-negative, and its
# gradient pulls towards the reference, where k1's has zero mean on-policy).
DEFAULT_KL_ESTIMATOR: dict[KLMode, KLEstimator] = {
    KLMode.REWARD: KLEstimator.K1,
    KLMode.LOSS: KLEstimator.K3,
    KLMode.NONE: KLEstimator.K1,
}


@KL_ESTIMATORS.register(KLEstimator.K1)
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs  # (B, A)


@KL_ESTIMATORS.register(KLEstimator.K2)
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2  # (B, A)


@KL_ESTIMATORS.register(KLEstimator.K3)
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = logprobs - ref_logprobs  # log p - log q, (B, A)
    exponent = (-log_ratio).clamp(max=_K3_MAX_EXPONENT)
    return torch.exp(exponent) - 1.0 - exponent  # (B, A)


def kl_penalized_rewards(
    scores: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str | KLEstimator = KLEstimator.K1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level rewards: -kl_coef * KL on every response token, the reward model's score
    added at the last response token (Ziegler et al.; InstructGPT).

    scores (B,), the rest (B, A) -> token_level_rewards (B, A), metrics.
    The KL uses the behaviour log-probs: the policy that actually sampled the tokens.
    """
    kl = KL_ESTIMATORS.get(estimator)(behaviour_logprobs, ref_logprobs) * response_mask  # (B, A)
    rewards = -kl_coef * kl  # (B, A)
    last = last_token_index(response_mask)  # (B,)
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    sequence_kl = masked_sum(kl, response_mask, dim=-1)  # (B,)
    metrics = {
        "kl/reward_penalty_mean": float((kl_coef * sequence_kl).mean()),
        "kl/sequence_mean": float(sequence_kl.mean()),
    }
    return rewards, metrics


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str | KLEstimator = KLEstimator.K3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean KL of the current policy from the reference, differentiable in `logprobs`.

    Multiply by the KL coefficient in the trainer (the controller owns the coefficient).
    """
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)  # (B, A)
    loss = masked_mean(kl, response_mask)
    return loss, {"kl/loss": float(loss.detach())}


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient so the observed KL tracks `target`.

    error = clip(KL / target - 1, -0.2, 0.2);  coef *= 1 + error * n_steps / horizon
    where n_steps is the number of samples the KL was measured on.
    """

    value: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"adaptive KL needs target > 0 and horizon > 0, got {self.target}, {self.horizon}"
            )

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KL_CONTROLLERS.add(KLControl.FIXED, lambda coef, target, horizon: FixedKLController(coef))
KL_CONTROLLERS.add(KLControl.ADAPTIVE, AdaptiveKLController)
