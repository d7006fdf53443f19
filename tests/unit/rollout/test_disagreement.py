"""The ensemble's disagreement about ordering a group of answers (services/common/disagreement.py)
against a hand computation and a vectorised numpy reference; the pair-major member scores of a
ScoreResponse cut into one group's rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.disagreement import member_matrix, pairwise_disagreement


def test_two_members_that_order_a_pair_oppositely():
    # Member 0: P(a better than b) = sigmoid(0 - ln 3) = 0.25; member 1: sigmoid(ln 3) = 0.75.
    scores = [[0.0, 0.0], [math.log(3), -math.log(3)]]
    assert pairwise_disagreement(scores) == pytest.approx(0.25)  # population std of {.25, .75}


def test_members_that_agree_do_not_disagree():
    assert pairwise_disagreement([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]]) == 0.0
    # The same score offset on every member: the same P for every member.
    assert pairwise_disagreement([[1.0, 3.0], [0.0, 2.0]]) == pytest.approx(0.0, abs=1e-15)


def test_the_largest_pair_counts_and_equals_a_numpy_reference():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 4)) * 2  # 5 answers, 4 members
    p = 1 / (1 + np.exp(-(scores[:, None, :] - scores[None, :, :])))  # (5, 5, 4)
    expected = p.std(axis=-1).max()  # ddof=0; the diagonal is 0
    assert pairwise_disagreement(scores.tolist()) == pytest.approx(expected, rel=1e-12)


def test_degenerate_groups_have_no_disagreement_and_ragged_ones_are_refused():
    assert pairwise_disagreement([]) == 0.0
    assert pairwise_disagreement([[0.1, 5.0]]) == 0.0  # one answer: nothing to order
    assert pairwise_disagreement([[0.1], [5.0]]) == 0.0  # one member: nobody to disagree with
    with pytest.raises(ValueError, match="every answer needs a score from every member"):
        pairwise_disagreement([[0.1, 0.2], [0.3]])


def test_member_matrix_reads_pair_major_scores():
    flat = [0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 2.0, 2.1, 2.2]  # 3 pairs x 3 members
    assert member_matrix(flat, 3, start=1, count=2) == [[1.0, 1.1, 1.2], [2.0, 2.1, 2.2]]
    with pytest.raises(ValueError, match="need 12 member scores, got 9"):
        member_matrix(flat, 3, start=2, count=2)
    with pytest.raises(ValueError, match="ensemble_size must be >= 1"):
        member_matrix(flat, 0, start=0, count=1)
