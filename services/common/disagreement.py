"""How unsure a reward-model ensemble is about ORDERING a set of answers to one prompt: the
figure `rlhf.v1.AnnotationCandidate.disagreement` carries (protos/rlhf/v1/events.proto).

Each ensemble member m gives, for a pair of answers (i, j), P_m(i better than j) =
sigmoid(s_im - s_jm) (Bradley-Terry). The members disagree about the pair by the standard
deviation of those probabilities across members (population std, ddof=0, as the reward service's
spreads); the set's disagreement is the largest over its pairs. It lies in [0, 0.5]: 0 when every
member orders every pair alike with the same confidence, 0.5 when half the members are certain
one way and half the other. The order of i and j does not matter (sigmoid(-x) = 1 - sigmoid(x)).

    scores = member_matrix(response.member_scores, response.ensemble_size, start=0, count=4)
    disagreement = pairwise_disagreement(scores)  # scores[i][m]: answer i, member m

Produced by the rollout worker (services/rollout/worker.py); the gateway's annotation queue only
reads the field. Tests: tests/unit/rollout/test_disagreement.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def member_matrix(
    member_scores: Sequence[float], ensemble_size: int, start: int, count: int
) -> list[list[float]]:
    """Rows `start .. start + count` of the pair-major `member_scores` (pair i, member j at
    i * ensemble_size + j): one row of `ensemble_size` scores per answer."""
    if ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
    end = (start + count) * ensemble_size
    if start < 0 or count < 0 or end > len(member_scores):
        raise ValueError(
            f"answers {start}..{start + count} x {ensemble_size} members need {end} member "
            f"scores, got {len(member_scores)}"
        )
    return [
        list(member_scores[i * ensemble_size : (i + 1) * ensemble_size])
        for i in range(start, start + count)
    ]


def pairwise_disagreement(scores: Sequence[Sequence[float]]) -> float:
    """max over pairs (i, j) of std over members m of sigmoid(scores[i][m] - scores[j][m]);
    0.0 with fewer than two answers or fewer than two members."""
    if not scores:
        return 0.0
    members = len(scores[0])
    if any(len(row) != members for row in scores):
        raise ValueError("every answer needs a score from every member")
    if len(scores) < 2 or members < 2:
        return 0.0
    worst = 0.0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            p = [_sigmoid(a - b) for a, b in zip(scores[i], scores[j])]
            mean = sum(p) / members
            std = math.sqrt(sum((x - mean) ** 2 for x in p) / members)
            worst = max(worst, std)
    return worst
