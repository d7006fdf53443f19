"""The trainer's reward-hacking guards through the real broker: rollouts carrying the ensemble's
spread and a gold score go through Kafka into the trainer service; its step summary and its
Prometheus metrics report the gold mean beside the reward-model mean and the spread, and an
update that would leave the KL budget is undone (the weights stay the initial ones) and
counted."""

from __future__ import annotations

import statistics
import threading

import pytest
import torch

from services.common.models import load_causal_lm
from services.trainer.learner import collate, response_logprobs
from services.trainer.loop import TrainerService, to_sample
from services.trainer.metrics import read_log
from services.trainer.settings import TrainerSettings
from tests.integration.trainer.helpers import private_topic, produce_groups, synthetic_group


def _on_policy_groups(model_dir) -> list[list]:
    """Two groups of four whose behaviour and reference log-probs are the initial policy's own,
    so that the policy starts at KL 0 from the reference."""
    groups = [synthetic_group(f"guard-{i}", 4) for i in range(2)]
    rollouts = [r for g in groups for r in g]
    model = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    batch = collate([to_sample(r) for r in rollouts], pad_id=0)
    with torch.no_grad():
        logprobs = response_logprobs(model, batch)  # (B, A)
    for i, r in enumerate(rollouts):
        own = logprobs[i, : len(r.response_token_ids)].tolist()
        r.behaviour_logprobs[:], r.reference_logprobs[:] = own, own
        r.reward_spread = 0.125 * (i % 4)
        if i % 2 == 0:
            r.gold_score = 1.0 - 0.25 * i
    return groups


def test_gold_spread_and_kl_budget_skips_are_reported(kafka_settings, tiny_lm_dir, tmp_path):
    topic = private_topic(kafka_settings)
    groups = _on_policy_groups(tiny_lm_dir)
    produce_groups(kafka_settings, topic, groups)
    settings = TrainerSettings(
        model_dir=tiny_lm_dir, algorithm="grpo", batch_size=8, max_steps=1, rollouts_topic=topic,
        consumer_group=f"trainer-{topic}", weights_topic="", state_dir=tmp_path / "trainer",
        kafka=kafka_settings, threads=1, max_staleness=100,
        learner={"lr": 1e-2, "kl_budget": 1e-6, "uncertainty_penalty": 0.5},
    )  # fmt: skip
    trainer = TrainerService(settings)
    initial = [p.detach().clone() for p in trainer.learner._parameters()]
    runner = threading.Thread(target=trainer.run)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "the trainer did not finish its update"
    trainer.close()

    rollouts = [r for g in groups for r in g]
    (update,) = [r for r in read_log(settings.metrics_log) if r.get("event") == "update"]
    gold = [r.gold_score for r in rollouts if r.HasField("gold_score")]
    assert update["gold/count"] == 4 and update["gold/mean"] == pytest.approx(
        statistics.fmean(gold)
    )
    assert update["reward/mean"] == pytest.approx(statistics.fmean(r.reward for r in rollouts))
    assert update["reward/spread_mean"] == pytest.approx(
        statistics.fmean(r.reward_spread for r in rollouts)
    )
    assert update["reward/shaped_mean"] == pytest.approx(
        statistics.fmean(r.reward - 0.5 * r.reward_spread for r in rollouts)
    )
    assert update["kl/policy_ref_before"] == pytest.approx(0.0, abs=1e-6)
    assert update["kl/policy_ref_after"] > 1e-6 and update["guard/kl_budget_skipped"] == 1.0
    for before, after in zip(initial, trainer.learner._parameters(), strict=True):
        assert torch.equal(before, after)  # the update was undone

    value = trainer.metrics.registry.get_sample_value
    assert value("rlhf_trainer_kl_budget_skips_total") == 1
    assert value("rlhf_trainer_gold_mean") == pytest.approx(statistics.fmean(gold))
    assert value("rlhf_trainer_reward_mean") == pytest.approx(update["reward/mean"])
    assert value("rlhf_trainer_reward_spread_mean") == pytest.approx(update["reward/spread_mean"])
    assert value("rlhf_trainer_length_reward_correlation") == pytest.approx(
        update["reward/length_corr"]
    )
