"""RL math for the trainer: KL estimators, advantage estimators, policy and value losses and KL
controllers, each a pure function (or small class) of tensors registered under a `str` Enum name;
and the reward-hacking guards (guards.py: score shaping, length correlation, the KL budget's
measure), plain functions of tensors.

    from services.trainer.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, ALGORITHMS
    spec = ALGORITHMS.get("grpo")
    advantages, returns = ADVANTAGE_ESTIMATORS.get(spec.advantage)(token_level_rewards=r, ...)

All tensors are padded response tensors of shape (B, A) (B sequences, A response tokens) with
a response mask that is 1.0 on valid tokens. Tests: tests/unit/trainer/test_algorithms.py.
"""

from services.trainer.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    gae_advantages,
    grpo_advantages,
    rloo_advantages,
)
from services.trainer.algorithms.guards import (
    length_reward_correlation,
    pearson,
    shaped_scores,
    token_mean_kl,
)
from services.trainer.algorithms.kl import (
    DEFAULT_KL_ESTIMATOR,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    KL_PLACEMENT,
    AdaptiveKLController,
    FixedKLController,
    KLControl,
    KLEstimator,
    KLMode,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_penalized_rewards,
)
from services.trainer.algorithms.losses import (
    POLICY_LOSSES,
    VALUE_LOSSES,
    PolicyLossName,
    ValueLossName,
    clipped_value_loss,
    entropy_from_logits,
    ppo_clip_loss,
)
from services.trainer.algorithms.masked import (
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from services.trainer.algorithms.registry import Registry
from services.trainer.algorithms.spec import ALGORITHMS, Algorithm, AlgorithmSpec

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ALGORITHMS",
    "DEFAULT_KL_ESTIMATOR",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "KL_PLACEMENT",
    "POLICY_LOSSES",
    "VALUE_LOSSES",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "Algorithm",
    "AlgorithmSpec",
    "FixedKLController",
    "KLControl",
    "KLEstimator",
    "KLMode",
    "PolicyLossName",
    "Registry",
    "ValueLossName",
    "clipped_value_loss",
    "entropy_from_logits",
    "gae_advantages",
    "grpo_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalized_rewards",
    "last_token_index",
    "length_reward_correlation",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pearson",
    "ppo_clip_loss",
    "rloo_advantages",
    "shaped_scores",
    "token_mean_kl",
]
