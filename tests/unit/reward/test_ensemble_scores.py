"""What the reward service answers for an ensemble: the mean per pair, the spread, the head
count and every head's score pair-major; a single head answers as before, with zero spreads."""

from __future__ import annotations

import numpy as np
import pytest

from services.reward.scorer import ScoredBatch
from services.reward.servicer import score_response


def scored(members: np.ndarray) -> ScoredBatch:
    return ScoredBatch(
        scores=members.mean(axis=1).astype(np.float32),
        spreads=members.std(axis=1).astype(np.float32),
        members=members.astype(np.float32),
        version=7,
        model_batch_sizes=[len(members)],
    )


def test_an_ensemble_answers_means_spreads_and_members_pair_major():
    members = np.array([[1.0, 2.0, 6.0], [-1.0, -1.0, -1.0]])
    reply = score_response(scored(members))
    assert reply.ensemble_size == 3 and reply.reward_model_version == 7
    assert list(reply.scores) == pytest.approx([3.0, -1.0])
    assert list(reply.spreads) == pytest.approx([np.sqrt(14 / 3), 0.0])  # population std
    assert list(reply.member_scores) == [1.0, 2.0, 6.0, -1.0, -1.0, -1.0]  # pair i at i * 3 + j


def test_one_head_answers_its_scores_zero_spreads_and_no_members():
    reply = score_response(scored(np.array([[0.5], [-0.25]])))
    assert list(reply.scores) == [0.5, -0.25]
    assert list(reply.spreads) == [0.0, 0.0]
    assert reply.ensemble_size == 1 and list(reply.member_scores) == []
