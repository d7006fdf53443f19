"""The join of feedback with the generation it rates, and what it emits.

For each feedback event (thumb or rating) whose generation is known:
  1. a binary label (KTO) for the rated answer: desirable for thumbs up or a 4-5 rating,
     undesirable for thumbs down or 1-2 (a neutral 3 emits nothing);
  2. a chosen/rejected pair with every other answer to the same prompt judged the other way
     (at most `max_pairs` per judgement), each pair once.
The label is emitted even when a pair follows: records are append-only, the pair may arrive
hours later, and KTO and Bradley-Terry consumers each take the kind they train on.

Cohorts: a label carries the cohort of its feedback (FeedbackEvent.cohort). A pair joins two
judgements; it carries their cohort when both came from the same one, and is left without one
(empty) when they differ: it is no one cohort's preference, and per-cohort agreement must not
count it for either.

Feedback whose generation is not known yet waits in the store (bounded in count per partition and
in age) and is joined when the generation arrives. Feedback ids joined before are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.common.kafka import decode
from services.common.preferences import (
    Source,
    derived_id,
    label_record,
    pair_record,
    prompt_hash,
    thumb_desirable,
)
from services.common.prompts import render_prompt
from services.curator.store import JoinStore
from services.genproto.rlhf.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

LIVE = Source.PREFERENCE_SOURCE_LIVE_FEEDBACK


@dataclass(frozen=True)
class JoinLimits:
    """Bounds of the join state."""

    max_pending_per_partition: int = 10_000
    """Feedback waiting for its generation in one partition; the oldest expires beyond it."""
    max_pending_age_s: float = 3600.0
    """Feedback older than this without its generation expires."""
    max_pairs: int = 16
    """Pairs one new judgement may form with opposite answers of the same prompt."""


@dataclass
class JoinCounts:
    """What one batch did, for metrics and tests."""

    joined: int = 0
    waiting: int = 0
    duplicates: int = 0
    expired: int = 0


def prompt_of(generation: events_pb2.GenerationRecord) -> str:
    """The prompt text preference records carry: the conversation as services.common.prompts
    renders it (what the reward model scores, and what rankings posted as text look like), not
    the policy's chat-templated string, which binds the data to one tokenizer. Records without a
    wire prompt fall back to the text the policy saw."""
    if generation.prompt.WhichOneof("kind"):
        return render_prompt(generation.prompt)
    return generation.prompt_text


def conversation_of(generation: events_pb2.GenerationRecord) -> common_pb2.Prompt:
    """The prompt as it was asked (chat messages or text); for records without a wire prompt,
    the rendered text as one plain-text prompt."""
    if generation.prompt.WhichOneof("kind"):
        return generation.prompt
    return common_pb2.Prompt(text=generation.prompt_text)


def on_generation(
    store: JoinStore,
    partition: int,
    generation: events_pb2.GenerationRecord,
    now: float,
    limits: JoinLimits,
    counts: JoinCounts,
) -> list[events_pb2.PreferenceRecord]:
    prompt = prompt_of(generation)
    store.add_generation(
        generation.response_id,
        partition,
        prompt,
        prompt_hash(prompt),
        generation.response_text,
        now,
        conversation_of(generation).SerializeToString(),
    )
    out: list[events_pb2.PreferenceRecord] = []
    for raw in store.take_pending(generation.response_id):
        out += on_feedback(
            store, partition, decode(events_pb2.FeedbackEvent, raw), now, limits, counts
        )
    return out


def on_feedback(
    store: JoinStore,
    partition: int,
    feedback: events_pb2.FeedbackEvent,
    now: float,
    limits: JoinLimits,
    counts: JoinCounts,
) -> list[events_pb2.PreferenceRecord]:
    if store.was_joined(feedback.feedback_id):
        counts.duplicates += 1
        return []
    generation = store.generation(feedback.response_id)
    if generation is None:
        store.add_pending(
            feedback.feedback_id, feedback.response_id, partition, feedback.SerializeToString(), now
        )
        counts.waiting += 1
        over = store.expire_pending(0.0, partition, keep=limits.max_pending_per_partition)
        _log_expired(over, "the pending bound of its partition was reached")
        counts.expired += len(over)
        return []
    store.mark_joined(feedback.feedback_id, now)
    counts.joined += 1
    desirable = thumb_desirable(feedback.thumb, feedback.rating)
    if desirable is None:
        return []
    prompt, key, response, asked = generation
    conversation = common_pb2.Prompt.FromString(asked) if asked else None
    rid = feedback.response_id
    label = label_record(
        prompt,
        response,
        desirable,
        LIVE,
        [feedback.feedback_id, rid],
        derived_id("label", feedback.feedback_id),
        conversation,
    )
    label.cohort = feedback.cohort
    out = [label]
    store.add_judged(key, rid, desirable, response, now, feedback.cohort)
    opposite = store.opposite_answers(key, rid, desirable, limits.max_pairs)
    for other_rid, other_response, other_cohort in opposite:
        if other_response == response:
            continue  # two ids, one text: no preference between them
        chosen, rejected = ((rid, response), (other_rid, other_response))[:: 1 if desirable else -1]
        pair_id = derived_id("pair-live", chosen[0], rejected[0])
        if store.mark_emitted(pair_id, now):
            pair = pair_record(
                prompt,
                chosen[1],
                rejected[1],
                LIVE,
                [chosen[0], rejected[0]],
                pair_id,
                conversation,
            )
            pair.cohort = pair_cohort(feedback.cohort, other_cohort)
            out.append(pair)
    return out


def pair_cohort(cohort: str, other: str) -> str:
    """The cohort of a pair made of two judgements: theirs when they share it, else none."""
    return cohort if cohort == other else ""


def expire_waiting(store: JoinStore, now: float, limits: JoinLimits, counts: JoinCounts) -> None:
    expired = store.expire_pending(now - limits.max_pending_age_s)
    _log_expired(expired, f"its generation did not arrive within {limits.max_pending_age_s:.0f}s")
    counts.expired += len(expired)


def _log_expired(feedback_ids: list[str], why: str) -> None:
    for feedback_id in feedback_ids:
        log.warning(
            "feedback expired unjoined", extra={"fields": {"feedback_id": feedback_id, "why": why}}
        )
