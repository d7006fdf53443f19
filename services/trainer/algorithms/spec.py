"""The RL algorithms the trainer offers, each a combination of registered parts.

An algorithm names its advantage estimator, policy loss, value loss (None: no critic), where
KL goes (the estimator follows from that: kl.DEFAULT_KL_ESTIMATOR) and whether advantages are
whitened; the learner reads the spec and looks every part up in its registry, so adding an
algorithm is one entry here, not a branch in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from services.trainer.algorithms.advantages import AdvantageEstimator
from services.trainer.algorithms.kl import KLMode
from services.trainer.algorithms.losses import PolicyLossName, ValueLossName
from services.trainer.algorithms.registry import Registry


class Algorithm(str, Enum):
    PPO = "ppo"
    GRPO = "grpo"
    RLOO = "rloo"


@dataclass(frozen=True)
class AlgorithmSpec:
    advantage: AdvantageEstimator
    """How advantages are estimated."""
    policy_loss: PolicyLossName
    """The surrogate objective the policy minimises."""
    value_loss: ValueLossName | None
    """The critic's loss; None for critic-free algorithms (no value head)."""
    kl_mode: KLMode
    """Where the KL to the reference goes by default: in the reward or in the loss."""
    whiten_advantages: bool
    """Whether advantages are whitened over the batch by default."""


ALGORITHMS: Registry = Registry("algorithm", Algorithm)

ALGORITHMS.add(
    Algorithm.PPO,
    AlgorithmSpec(
        advantage=AdvantageEstimator.GAE,
        policy_loss=PolicyLossName.PPO_CLIP,
        value_loss=ValueLossName.CLIPPED_MSE,
        kl_mode=KLMode.REWARD,
        whiten_advantages=True,
    ),
)
ALGORITHMS.add(
    Algorithm.GRPO,
    AlgorithmSpec(
        advantage=AdvantageEstimator.GRPO,
        policy_loss=PolicyLossName.PPO_CLIP,
        value_loss=None,
        kl_mode=KLMode.LOSS,
        whiten_advantages=False,
    ),
)
ALGORITHMS.add(
    Algorithm.RLOO,
    AlgorithmSpec(
        advantage=AdvantageEstimator.RLOO,
        policy_loss=PolicyLossName.PPO_CLIP,
        value_loss=None,
        kl_mode=KLMode.REWARD,
        whiten_advantages=False,
    ),
)
