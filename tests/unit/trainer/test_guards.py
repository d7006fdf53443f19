"""The trainer's reward-hacking guards on hand-made tensors and on the real learner: the
uncertainty penalty and length control shape the score exactly as specified (an update with a
guard equals an unguarded update on the hand-shaped scores, bit for bit), the length/reward
correlation equals a reference, the hard KL budget undoes an over-budget step leaving parameters
AND optimizer state bit-identical and applies an under-budget one, the gold mean is reported,
and the Kafka loop and metrics carry the new fields.

    pytest tests/unit/trainer/test_guards.py -q
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch
from prometheus_client import CollectorRegistry

from services.common.models import load_causal_lm
from services.genproto.rlhf.v1 import events_pb2
from services.trainer.algorithms import (
    KL_ESTIMATORS,
    pearson,
    shaped_scores,
    token_mean_kl,
)
from services.trainer.learner import Learner, LearnerConfig, RolloutSample
from services.trainer.loop import to_sample
from services.trainer.metrics import TrainerMetrics
from services.trainer.rollouts import collate
from tests.unit.trainer.rl_loop import random_prompts, rollouts

# ---- pure functions on hand-made tensors --------------------------------------------------


def test_uncertainty_penalty_and_length_control_shape_the_score():
    scores = torch.tensor([1.0, 2.0, -1.0])
    spreads = torch.tensor([0.5, 0.0, 1.0])
    lengths = torch.tensor([2.0, 4.0, 1.0])
    off, metrics = shaped_scores(scores, spreads, lengths)
    assert torch.equal(off, scores)
    assert metrics["reward/spread_mean"] == pytest.approx(0.5)
    penalised, metrics = shaped_scores(scores, spreads, lengths, uncertainty_penalty=2.0)
    assert penalised.tolist() == [0.0, 2.0, -3.0]  # score - 2 * spread
    assert metrics["reward/shaped_mean"] == pytest.approx(-1.0 / 3)
    normalised, _ = shaped_scores(scores, spreads, lengths, length_normalise=True)
    assert normalised.tolist() == [0.5, 0.5, -1.0]  # score / tokens
    everything, _ = shaped_scores(
        scores, spreads, lengths, uncertainty_penalty=2.0, length_normalise=True, length_penalty=0.1
    )
    # ((score - 2 * spread) / tokens) - 0.1 * tokens
    assert everything.tolist() == pytest.approx([0.0 - 0.2, 0.5 - 0.4, -3.0 - 0.1])


def test_pearson_equals_the_reference_and_is_zero_where_undefined():
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    y = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0]
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(
        statistics.correlation(x, y), abs=1e-12
    )
    assert pearson(torch.tensor([2.0, 2.0, 2.0]), torch.tensor(y[:3])) == 0.0
    assert pearson(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0


def test_token_mean_kl_equals_a_loop_over_tokens():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 4, generator=generator) * 3
    reference = -torch.rand(3, 4, generator=generator) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    total, tokens = token_mean_kl(logprobs, reference, mask, "k3")
    expected = []
    for i in range(3):
        for j in range(4):
            if mask[i, j]:
                r = float(logprobs[i, j] - reference[i, j])
                expected.append(math.exp(-r) - 1 + r)
    assert float(tokens) == len(expected) == 8
    assert float(total) == pytest.approx(sum(expected), rel=1e-5)
    k1_total, _ = token_mean_kl(logprobs, reference, mask, "k1")
    assert float(k1_total) == pytest.approx(float(((logprobs - reference) * mask).sum()), rel=1e-5)
    assert "k3" in KL_ESTIMATORS


# ---- on the learner -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_of_rollouts(small_vocab_policy_dir) -> list[RolloutSample]:
    """16 rollouts (4 prompts x 4) from the initial small policy, with hand-made spreads and
    gold scores."""
    learner = Learner(LearnerConfig(algorithm="grpo"), small_vocab_policy_dir)
    reference = load_causal_lm(small_vocab_policy_dir, torch.device("cpu"), torch.float32)
    prompts = random_prompts(torch.Generator().manual_seed(3), 4)
    samples = rollouts(learner, reference, prompts, seed=0)
    for i, sample in enumerate(samples):
        sample.reward = float(i % 5) / 4
        sample.reward_spread = float(i % 3) / 2
        sample.gold_score = float(i % 2) if i < 12 else None
    return samples


def _params(learner: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner._parameters()]


def _optimizer_state(learner: Learner) -> dict:
    return {
        index: {key: value.clone() for key, value in state.items()}
        for index, state in learner.optimizer.state_dict()["state"].items()
    }


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for index, state in a.items():
        assert state.keys() == b[index].keys()
        for key, value in state.items():
            assert torch.equal(value, b[index][key]), (index, key)


def _step(policy_dir, samples, **config) -> tuple[Learner, dict]:
    fields = {"algorithm": "grpo", "lr": 5e-3, "seed": 0, **config}
    learner = Learner(LearnerConfig(**fields), policy_dir)
    return learner, learner.step(samples)


@pytest.mark.parametrize(
    "guard,shape",
    [
        # Coefficients exact in binary, so that float32 and float64 arithmetic agree exactly.
        ({"uncertainty_penalty": 0.75}, lambda s: s.reward - 0.75 * s.reward_spread),
        ({"length_penalty": 0.0625}, lambda s: s.reward - 0.0625 * len(s.response_token_ids)),
        ({"length_normalise": True}, lambda s: s.reward / len(s.response_token_ids)),
    ],
)
def test_a_guarded_update_is_the_update_on_the_shaped_scores(
    small_vocab_policy_dir, batch_of_rollouts, guard, shape
):
    guarded, metrics = _step(small_vocab_policy_dir, batch_of_rollouts, **guard)
    by_hand = [
        dataclasses.replace(s, reward=shape(s), reward_spread=0.0) for s in batch_of_rollouts
    ]
    plain, _ = _step(small_vocab_policy_dir, by_hand)
    unguarded, _ = _step(small_vocab_policy_dir, batch_of_rollouts)
    for a, b in zip(_params(guarded), _params(plain), strict=True):
        assert torch.equal(a, b)
    assert any(
        not torch.allclose(a, b) for a, b in zip(_params(guarded), _params(unguarded), strict=True)
    ), "the guard changed nothing"
    expected = statistics.fmean(shape(s) for s in batch_of_rollouts)
    assert metrics["reward/shaped_mean"] == pytest.approx(expected, rel=1e-5)
    # reward/mean stays the reward model's own mean: the figure the gold mean sits beside.
    assert metrics["reward/mean"] == pytest.approx(
        statistics.fmean(s.reward for s in batch_of_rollouts), rel=1e-6
    )


def test_the_step_reports_spread_gold_and_the_length_reward_correlation(
    small_vocab_policy_dir, batch_of_rollouts
):
    _, metrics = _step(small_vocab_policy_dir, batch_of_rollouts)
    samples = batch_of_rollouts
    assert metrics["reward/spread_mean"] == pytest.approx(
        statistics.fmean(s.reward_spread for s in samples), rel=1e-6
    )
    gold = [s.gold_score for s in samples if s.gold_score is not None]
    assert metrics["gold/count"] == 12 and metrics["gold/mean"] == pytest.approx(
        statistics.fmean(gold)
    )
    lengths = [float(len(s.response_token_ids)) for s in samples]
    assert len(set(lengths)) > 1, "the fixture should have responses of several lengths"
    assert metrics["reward/length_corr"] == pytest.approx(
        statistics.correlation(lengths, [s.reward for s in samples]), abs=1e-6
    )
    assert metrics["response/length_mean"] == pytest.approx(statistics.fmean(lengths))
    no_gold = [dataclasses.replace(s, gold_score=None) for s in samples]
    _, metrics = _step(small_vocab_policy_dir, no_gold)
    assert "gold/mean" not in metrics and "guard/kl_budget_skipped" not in metrics


def test_an_update_over_the_kl_budget_is_undone_bit_for_bit(
    small_vocab_policy_dir, batch_of_rollouts
):
    # A first, applied step, so that the optimizer has moments and a step count to restore.
    learner = Learner(LearnerConfig(algorithm="grpo", lr=5e-2, seed=0), small_vocab_policy_dir)
    learner.step(batch_of_rollouts)
    learner.config.kl_budget = 1e-6  # any real step from here goes over it
    params, optimizer = _params(learner), _optimizer_state(learner)
    scheduler, lr = learner.scheduler.state_dict(), learner.scheduler.get_last_lr()
    metrics = learner.step(batch_of_rollouts)
    assert metrics["guard/kl_budget_skipped"] == 1.0 and metrics["guard/kl_budget_skips"] == 1.0
    assert metrics["kl/policy_ref_after"] > 1e-6
    assert metrics["kl/policy_ref_after"] > metrics["kl/policy_ref_before"]
    assert metrics["kl/policy_ref"] == metrics["kl/policy_ref_before"]
    for a, b in zip(params, _params(learner), strict=True):
        assert torch.equal(a, b)
    _assert_same_state(optimizer, _optimizer_state(learner))
    assert learner.scheduler.state_dict() == scheduler and learner.scheduler.get_last_lr() == lr
    assert learner.state_dict()["kl_budget_skips"] == 1

    # From a fresh optimizer (no moments yet): the state stays empty.
    fresh = Learner(
        LearnerConfig(algorithm="grpo", lr=5e-2, kl_budget=1e-6, seed=0), small_vocab_policy_dir
    )
    params = _params(fresh)
    assert fresh.step(batch_of_rollouts)["guard/kl_budget_skipped"] == 1.0
    assert fresh.optimizer.state_dict()["state"] == {}
    for a, b in zip(params, _params(fresh), strict=True):
        assert torch.equal(a, b)


def test_an_update_under_the_kl_budget_is_applied_unchanged(
    small_vocab_policy_dir, batch_of_rollouts
):
    budgeted, metrics = _step(small_vocab_policy_dir, batch_of_rollouts, kl_budget=10.0)
    free, _ = _step(small_vocab_policy_dir, batch_of_rollouts)
    assert metrics["guard/kl_budget_skipped"] == 0.0
    assert 0 < metrics["kl/policy_ref_after"] < 10.0
    assert metrics["kl/policy_ref"] == metrics["kl/policy_ref_after"]
    for a, b in zip(_params(budgeted), _params(free), strict=True):
        assert torch.equal(a, b)  # measuring KL changed nothing
    _assert_same_state(_optimizer_state(budgeted), _optimizer_state(free))


def test_a_step_back_towards_the_reference_is_kept_even_over_budget(
    small_vocab_policy_dir, batch_of_rollouts
):
    """The rule on its own: a step that ends over the budget is undone only if it also ended
    above where it started."""
    learner = Learner(LearnerConfig(algorithm="grpo", lr=5e-2, seed=0), small_vocab_policy_dir)
    batch = collate(batch_of_rollouts, pad_id=learner._pad_id())
    snapshot, kl_before = learner._snapshot_and_kl(batch)
    learner.step(batch_of_rollouts)  # no budget yet: applied
    moved = _params(learner)
    learner.config.kl_budget = 1e-6
    kept = learner._enforce_kl_budget(batch, snapshot, kl_before=1e9)  # it "came down" from 1e9
    assert kept["guard/kl_budget_skipped"] == 0.0 and learner.kl_budget_skips == 0
    for a, b in zip(moved, _params(learner), strict=True):
        assert torch.equal(a, b)
    undone = learner._enforce_kl_budget(batch, snapshot, kl_before)  # it went up: undone
    assert undone["guard/kl_budget_skipped"] == 1.0 and learner.kl_budget_skips == 1
    for a, b in zip(snapshot["parameters"], _params(learner), strict=True):
        assert torch.equal(a, b)


def test_bad_guard_settings_are_refused():
    with pytest.raises(ValueError, match="kl_budget must be > 0"):
        LearnerConfig(kl_budget=0.0).validate()
    with pytest.raises(ValueError, match="uncertainty_penalty must be >= 0"):
        LearnerConfig(uncertainty_penalty=-1.0).validate()
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        LearnerConfig(length_penalty=-0.1).validate()
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        LearnerConfig(kl_budget_estimator="k9").validate()
    sample = RolloutSample([1], [2], [-1.0], [-1.0], 0.0, "g", reward_spread=-0.5)
    with pytest.raises(ValueError, match="reward spread -0.5 must be finite and >= 0"):
        sample.validate()
    with pytest.raises(ValueError, match="gold score nan is not finite"):
        dataclasses.replace(sample, reward_spread=0.0, gold_score=math.nan).validate()


# ---- the Kafka loop's side ----------------------------------------------------------------


def test_a_rollout_carries_its_spread_and_gold_score_to_the_learner():
    fields = {
        "rollout_id": "r", "prompt_token_ids": [1], "response_token_ids": [2],
        "behaviour_logprobs": [-1.0], "reference_logprobs": [-1.0], "reward": 0.5,
    }  # fmt: skip
    with_gold = to_sample(events_pb2.Rollout(**fields, reward_spread=0.25, gold_score=0.0))
    assert (with_gold.reward_spread, with_gold.gold_score) == (0.25, 0.0)  # 0 is a gold score
    without = to_sample(events_pb2.Rollout(**fields))
    assert (without.reward_spread, without.gold_score) == (0.0, None)


def test_the_guard_metrics_reach_prometheus():
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    step = {
        "reward/mean": 0.9, "gold/mean": 0.2, "reward/spread_mean": 0.3,
        "reward/length_corr": 0.8, "response/length_mean": 7.5,
        "guard/kl_budget_skipped": 1.0, "kl/policy_ref": 0.04,
    }  # fmt: skip
    metrics.observe_update(step, [0], 0.1)
    metrics.observe_update({**step, "guard/kl_budget_skipped": 0.0}, [0], 0.1)
    value = registry.get_sample_value
    assert value("rlhf_trainer_kl_budget_skips_total") == 1
    assert value("rlhf_trainer_reward_mean") == 0.9 and value("rlhf_trainer_gold_mean") == 0.2
    assert value("rlhf_trainer_reward_spread_mean") == 0.3
    assert value("rlhf_trainer_length_reward_correlation") == 0.8
    assert value("rlhf_trainer_response_length_tokens") == 7.5
    assert value("rlhf_trainer_kl_policy_ref_per_token") == 0.04


def test_ppo_measures_the_kl_before_the_step_from_its_value_pass(
    small_vocab_policy_dir, batch_of_rollouts
):
    """With a value head the learner already ran the policy over the batch before the update;
    the KL before the step comes from those log-probs, equal to a pass of its own, and an
    over-budget PPO step is still undone bit for bit."""
    learner = Learner(LearnerConfig(algorithm="ppo", lr=5e-2, seed=0), small_vocab_policy_dir)
    learner.step(batch_of_rollouts)  # moments to restore, and a policy away from the reference
    batch = collate(batch_of_rollouts, pad_id=learner._pad_id()).to(learner.device)
    with torch.no_grad():
        logprobs, _, _ = learner._forward(batch, need_entropy=False)
    own_pass = learner._policy_ref_kl(batch)
    assert own_pass > 0
    assert learner._policy_ref_kl(batch, logprobs) == pytest.approx(own_pass, rel=1e-5)
    learner.config.kl_budget = 1e-6
    params, optimizer = _params(learner), _optimizer_state(learner)
    metrics = learner.step(batch_of_rollouts)
    assert metrics["guard/kl_budget_skipped"] == 1.0
    assert metrics["kl/policy_ref_before"] == pytest.approx(own_pass, rel=1e-5)
    for a, b in zip(params, _params(learner), strict=True):
        assert torch.equal(a, b)
    _assert_same_state(optimizer, _optimizer_state(learner))
