"""Rollout records built from a Generate reply, the scores and the reference log-probs; the
backpressure arithmetic; group-to-partition placement."""

from __future__ import annotations

import pytest

from services.genproto.rlhf.v1 import common_pb2, policy_pb2
from services.rollout.worker import build_rollouts, expected_staleness, group_partition


def _completion(index: int, n: int) -> policy_pb2.Completion:
    return policy_pb2.Completion(
        prompt_index=index,
        prompt_token_ids=[1, 2, 3 + index],
        samples=[
            policy_pb2.Sample(
                response_id=f"resp-{index}-{k}",
                token_ids=[10 + k, 11],
                logprobs=[-0.5, -1.0 - k],
                weights_version=3,
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
            )
            for k in range(n)
        ],
    )


def test_one_rollout_per_sample_with_everything_the_trainer_needs():
    completions = [_completion(0, 2), _completion(1, 2)]
    scores = [0.1, 0.2, 0.3, 0.4]
    reference = [[-0.6, -1.1], [-0.7, -1.2], [-0.8, -1.3], [-0.9, -1.4]]
    rollouts = build_rollouts(completions, scores, reference)
    assert [r.rollout_id for r in rollouts] == ["resp-0-0", "resp-0-1", "resp-1-0", "resp-1-1"]
    assert (
        rollouts[0].group_id == rollouts[1].group_id != rollouts[2].group_id == rollouts[3].group_id
    )
    assert all(r.group_size == 2 and r.weights_version == 3 for r in rollouts)
    r = rollouts[3]
    assert list(r.prompt_token_ids) == [1, 2, 4] and list(r.response_token_ids) == [11, 11]
    assert list(r.behaviour_logprobs) == [-0.5, -2.0]
    assert list(r.reference_logprobs) == pytest.approx([-0.9, -1.4])
    assert r.reward == pytest.approx(0.4) and r.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert r.created_at.seconds > 0


def test_rollouts_carry_prompt_text_and_reward_model_version():
    completions = [_completion(1, 1), _completion(0, 1)]  # out of order: prompt_index decides
    for completion, text in zip(completions, ("second answer", "first answer")):
        completion.samples[0].text = text
    prompts = [common_pb2.Prompt(text="first?"), common_pb2.Prompt(text="second?")]
    rollouts = build_rollouts(
        completions, [0.1, 0.2], [[-0.6, -1.1]] * 2, prompts, reward_model_version=7
    )
    assert [(r.prompt.text, r.response_text) for r in rollouts] == [
        ("second?", "second answer"),
        ("first?", "first answer"),
    ]
    assert {r.reward_model_version for r in rollouts} == {7}
    assert not build_rollouts(completions, [0.1, 0.2], [[-0.6, -1.1]] * 2)[0].HasField("prompt")


def test_reference_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="log-probs for 2 tokens"):
        build_rollouts([_completion(0, 1)], [0.0], [[-0.1]])


def test_expected_staleness():
    # Trainer at 5, policy at 5, 16 rollouts waiting, 8 per version: used at version 7 -> 2 stale.
    assert expected_staleness(5, 5, 16, 8) == 2
    assert expected_staleness(4, 5, 0, 8) == 1  # the policy has not caught up yet
    assert expected_staleness(5, 5, 4, 8) == 0.5


def test_a_group_always_lands_on_one_partition():
    assert {group_partition("group-x", 4) for _ in range(3)} == {group_partition("group-x", 4)}
    assert len({group_partition(f"g{i}", 4) for i in range(100)}) == 4
