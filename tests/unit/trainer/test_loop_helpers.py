"""Small pieces of the trainer loop: Rollout -> learner sample, and positions after a change in
the number of ranks."""

from __future__ import annotations

import pytest

from services.genproto.rlhf.v1 import events_pb2
from services.trainer.checkpoint import ConsumerPosition
from services.trainer.distributed import agree, weights_digest
from services.trainer.loop import merge_positions, to_sample


def test_rollout_becomes_a_learner_sample():
    r = events_pb2.Rollout(
        rollout_id="r1", group_id="g1", prompt_token_ids=[1, 2], response_token_ids=[3],
        behaviour_logprobs=[-0.5], reference_logprobs=[-0.25], reward=1.5, weights_version=4,
    )  # fmt: skip
    s = to_sample(r)
    assert (
        s.prompt_token_ids,
        s.response_token_ids,
        s.behaviour_logprobs,
        s.reference_logprobs,
    ) == ([1, 2], [3], [-0.5], [-0.25])
    assert (s.reward, s.group_id, s.weights_version, s.rollout_id) == (1.5, "g1", 4, "r1")
    assert to_sample(events_pb2.Rollout(rollout_id="solo", prompt_token_ids=[1], response_token_ids=[2],
                                        behaviour_logprobs=[-1], reference_logprobs=[-1])).group_id == "solo"  # fmt: skip


def test_malformed_rollout_is_refused_with_a_reason():
    r = events_pb2.Rollout(
        rollout_id="bad", prompt_token_ids=[1], response_token_ids=[3, 4], behaviour_logprobs=[-0.5]
    )
    with pytest.raises(ValueError, match="bad: 2 response tokens"):
        to_sample(r)


def test_positions_of_two_ranks_merge_into_the_share_of_one():
    positions = {0: ConsumerPosition({0: 5, 2: 7}, ["a"]), 1: ConsumerPosition({1: 3, 3: 9}, ["b"])}
    merged = merge_positions(positions, mine=[0, 1, 2, 3])
    assert merged.offsets == {0: 5, 1: 3, 2: 7, 3: 9} and sorted(merged.skip_ids) == ["a", "b"]
    assert merge_positions(positions, mine=[1, 3]).offsets == {1: 3, 3: 9}


def test_single_process_agreement_and_digest():
    import torch

    assert agree(8, False) == (True, False) and agree(0, True) == (False, True)
    a = {"w": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.bfloat16)}
    assert weights_digest(a) == weights_digest({k: v.clone() for k, v in a.items()})
    assert weights_digest(a) != weights_digest({**a, "w": torch.ones(2, 2) * 1.0001})
