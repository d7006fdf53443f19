"""Step 6 of the rollout worker: which groups of a round people should rank. A group (the
answers to one prompt) whose reward-ensemble members disagree on ordering it by at least the
threshold becomes an `rlhf.v1.AnnotationCandidate` for `rlhf.annotation-queue.v1`; the gateway
serves the queue (GET /v1/annotation-queue) and a person's ranking comes back with the
candidate id, which is the group id, so the ranked answers are the group's rollouts.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.disagreement import member_matrix, pairwise_disagreement
from services.common.prompts import render_prompt
from services.genproto.rlhf.v1 import events_pb2, reward_pb2


def annotation_candidates(
    rollouts: list[events_pb2.Rollout], scored: reward_pb2.ScoreResponse, min_disagreement: float
) -> list[events_pb2.AnnotationCandidate]:
    """The groups of `rollouts` (in the order `scored` scored them) that the reward ensemble
    disagrees on by at least `min_disagreement`; none from a single head."""
    size = scored.ensemble_size
    if size < 2:
        return []
    now = Timestamp()
    now.GetCurrentTime()
    candidates, start = [], 0
    while start < len(rollouts):
        group = rollouts[start : start + rollouts[start].group_size]
        matrix = member_matrix(scored.member_scores, size, start, len(group))
        disagreement = pairwise_disagreement(matrix)
        if len(group) > 1 and disagreement >= min_disagreement:
            first = group[0]
            candidates.append(
                events_pb2.AnnotationCandidate(
                    candidate_id=first.group_id,
                    prompt=first.prompt,
                    prompt_text=render_prompt(first.prompt),
                    responses=[r.response_text for r in group],
                    response_ids=[r.rollout_id for r in group],
                    disagreement=disagreement,
                    reason="ensemble",
                    reward_model_version=scored.reward_model_version,
                    created_at=now,
                )
            )
        start += len(group)
    return candidates
