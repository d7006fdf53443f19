"""Rollout records built from a Generate reply, the scores (with the ensemble's spreads and the
gold score) and the reference log-probs; annotation candidates from the ensemble's member scores;
replies that do not fit; the backpressure arithmetic; group-to-partition placement."""

from __future__ import annotations

import math

import pytest

from services.genproto.rlhf.v1 import common_pb2, policy_pb2, reward_pb2
from services.rollout.candidates import annotation_candidates
from services.rollout.settings import RolloutSettings
from services.rollout.worker import (
    build_rollouts,
    check_score_response,
    expected_staleness,
    group_partition,
)


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


def test_rollouts_carry_the_ensemble_spread_and_the_gold_score():
    completions = [_completion(0, 2)]
    rollouts = build_rollouts(
        completions, [0.1, 0.2], [[-0.6, -1.1]] * 2, spreads=[0.25, 0.5], gold=[0.0, -1.5]
    )
    assert [r.reward_spread for r in rollouts] == [0.25, 0.5]
    assert all(r.HasField("gold_score") for r in rollouts)  # 0.0 is a score, not "unset"
    assert [r.gold_score for r in rollouts] == [0.0, -1.5]
    # A single-head or older reward service sends no spreads; no gold annotator: no gold score.
    plain = build_rollouts(completions, [0.1, 0.2], [[-0.6, -1.1]] * 2, spreads=[])
    assert [r.reward_spread for r in plain] == [0.0, 0.0]
    assert not any(r.HasField("gold_score") for r in plain)


def _scored(members: list[list[float]], version: int = 4) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(
        scores=[sum(m) / len(m) for m in members],
        spreads=[0.0] * len(members),
        ensemble_size=len(members[0]),
        member_scores=[s for m in members for s in m],
        reward_model_version=version,
    )


def test_groups_the_ensemble_disagrees_on_become_annotation_candidates():
    completions = [_completion(0, 2), _completion(1, 2), _completion(2, 1)]
    for c in completions:
        for k, sample in enumerate(c.samples):
            sample.text = f"answer {c.prompt_index}.{k}"
    prompts = [common_pb2.Prompt(text=f"question {i}?") for i in range(3)]
    ln3 = math.log(3)
    members = [
        [0.0, 0.0], [ln3, -ln3],  # group 0: members order the pair oppositely (0.25)
        [1.0, 1.0], [0.0, 0.0],  # group 1: members agree (0.0)
        [0.0, 9.0],  # group 2: one answer, nothing to order
    ]  # fmt: skip
    scored = _scored(members)
    rollouts = build_rollouts(completions, list(scored.scores), [[-0.6, -1.1]] * 5, prompts, 4)
    (candidate,) = annotation_candidates(rollouts, scored, min_disagreement=0.1)
    assert candidate.candidate_id == rollouts[0].group_id
    assert candidate.prompt.text == candidate.prompt_text == "question 0?"
    assert list(candidate.responses) == ["answer 0.0", "answer 0.1"]
    assert list(candidate.response_ids) == ["resp-0-0", "resp-0-1"]
    assert candidate.disagreement == pytest.approx(0.25)
    assert candidate.reason == "ensemble" and candidate.reward_model_version == 4
    assert candidate.created_at.seconds > 0
    # 0 offers every group of two or more answers; above 0.25 nothing; one head never.
    assert len(annotation_candidates(rollouts, scored, 0.0)) == 2
    assert annotation_candidates(rollouts, scored, 0.26) == []
    single = reward_pb2.ScoreResponse(scores=scored.scores, ensemble_size=1)
    assert annotation_candidates(rollouts, single, 0.0) == []


@pytest.mark.parametrize(
    "reply,message",
    [
        (reward_pb2.ScoreResponse(scores=[0.1]), "asked for 2 scores, got 1"),
        (reward_pb2.ScoreResponse(scores=[0.1, 0.2], spreads=[0.0]), "got 1 spreads"),
        (
            reward_pb2.ScoreResponse(scores=[0.1, 0.2], ensemble_size=3, member_scores=[0.1] * 5),
            "2 pairs x 3 members, got 5 member scores",
        ),
    ],
)
def test_a_reward_reply_that_does_not_fit_the_request_is_an_error(reply, message):
    with pytest.raises(RuntimeError, match=message):
        check_score_response(reply, 2)
    check_score_response(reward_pb2.ScoreResponse(scores=[0.1, 0.2]), 2)  # an older service: fine


def test_annotation_candidates_are_off_unless_configured(tmp_path):
    dataset = tmp_path / "p.jsonl"
    dataset.write_text('{"prompt": "hi"}\n')
    assert RolloutSettings(dataset=dataset).annotation_min_disagreement is None
    assert RolloutSettings(dataset=dataset).annotation_topic == "rlhf.annotation-queue.v1"
    with pytest.raises(ValueError, match="less than or equal to 0.5"):
        RolloutSettings(dataset=dataset, annotation_min_disagreement=0.7)
