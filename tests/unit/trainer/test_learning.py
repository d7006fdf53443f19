"""RL improves a tiny policy by the measure it is given: the fraction of response tokens equal
to a chosen token (about 1/16 for the random policy) rises clearly within 20 CPU steps for PPO,
GRPO and RLOO, while the KL to the reference stays finite. Seeded, so each run is identical.

    pytest tests/unit/trainer/test_learning.py -q -s   # -s prints the reward curves
"""

from __future__ import annotations

import math
import statistics

import pytest

from services.trainer.learner import LearnerConfig
from tests.unit.trainer.rl_loop import run_rl

STEPS = 20


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_mean_reward_rises(small_vocab_policy_dir, algorithm):
    config = LearnerConfig(
        algorithm=algorithm, lr=5e-3, kl_coef=0.01, ppo_epochs=1, minibatch_size=8, seed=0
    )
    history = run_rl(small_vocab_policy_dir, config, STEPS)
    curve = [m["reward/mean"] for m in history]
    first, last = statistics.fmean(curve[:5]), statistics.fmean(curve[-5:])
    step_s = statistics.fmean(m["time/step_s"] for m in history)
    print(
        f"\n{algorithm}: reward {first:.3f} (first 5) -> {last:.3f} (last 5), "
        f"step {step_s * 1000:.0f} ms,"
        f" curve {[round(r, 2) for r in curve]}"
    )
    assert first < 0.2, "the random policy should rarely emit the target token"
    assert last > first + 0.4
    for metrics in history:
        assert all(math.isfinite(value) for value in metrics.values()), metrics
    final_kl = history[-1]["kl/behaviour_ref_k1"]
    assert 0 < final_kl < 8 * math.log(16)  # at most every token deterministic: 8 tokens x log(V)
    if algorithm == "ppo":
        assert history[-1]["value/mean"] > 0.3  # the critic learned that rewards went up


def test_kl_penalty_keeps_the_policy_closer_to_the_reference(small_vocab_policy_dir):
    # Same seed and data stream: only the KL coefficient differs.
    def final_kl(coef: float) -> float:
        config = LearnerConfig(algorithm="grpo", lr=5e-3, kl_coef=coef, minibatch_size=8, seed=0)
        return run_rl(small_vocab_policy_dir, config, 10)[-1]["kl/behaviour_ref_k1"]

    loose, tight = final_kl(0.0), final_kl(2.0)
    print(f"\nsequence KL after 10 GRPO steps: coef 0 -> {loose:.2f}, coef 2 -> {tight:.2f}")
    assert tight < 0.7 * loose
