"""Conversion of the HTTP requests into Kafka records, in one place.

    feedback    -> one FeedbackEvent on rlhf.feedback.v1, keyed by response id (the curator
                   joins it with the generation it rates);
    preference  -> one PreferenceRecord (pair) on rlhf.preferences.v1, keyed by prompt hash;
    ranking     -> its K(K-1)/2 ordered pairs on rlhf.preferences.v1, keyed by prompt hash.

Pairwise preferences and rankings need no join (they carry their texts), so they go straight to
the preferences topic instead of through the curator. Event ids are derived from the caller's
key id and idempotency key, so the same key posted to any gateway replica yields the same ids
and downstream consumers keep one copy.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import topics
from services.common.preferences import Source, derived_id, pair_record, prompt_hash, ranking_pairs
from services.gateway.auth import ApiKey
from services.gateway.protocol import FeedbackRequest, PreferenceRequest, RankingRequest
from services.genproto.rlhf.v1 import events_pb2

THUMBS = {
    "up": events_pb2.THUMB_UP,
    "down": events_pb2.THUMB_DOWN,
    None: events_pb2.THUMB_UNSPECIFIED,
}


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: str
    value: Message


@dataclass(frozen=True)
class Event:
    """What one accepted request writes: its id and its Kafka records (all or 503)."""

    event_id: str
    records: list[OutgoingRecord]


def event_id(kind: str, api_key: ApiKey, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"{kind}-{uuid.uuid4().hex}"
    digest = hashlib.sha256(f"{api_key.key_id}\x1f{idempotency_key}".encode()).hexdigest()[:32]
    return f"{kind}-{digest}"


def feedback_event(request: FeedbackRequest, api_key: ApiKey) -> Event:
    feedback_id = event_id("fb", api_key, request.idempotency_key)
    created = Timestamp()
    created.FromNanoseconds(time.time_ns())
    value = events_pb2.FeedbackEvent(
        feedback_id=feedback_id,
        response_id=request.response_id,
        thumb=THUMBS[request.thumb],
        rating=request.rating or 0,
        comment=request.comment or "",
        categories=request.categories,
        user_id=request.user_id or "",
        idempotency_key=request.idempotency_key or "",
        created_at=created,
        cohort=request.cohort or "",
    )
    return Event(feedback_id, [OutgoingRecord(topics.FEEDBACK, request.response_id, value)])


def preference_event(request: PreferenceRequest, api_key: ApiKey) -> Event:
    pref_id = event_id("pref", api_key, request.idempotency_key)
    record = pair_record(
        request.prompt,
        request.chosen,
        request.rejected,
        Source.PREFERENCE_SOURCE_ANNOTATION,
        [pref_id],
        derived_id("pair", pref_id, "0", "1"),
    )
    _annotate(record, request)
    key = prompt_hash(request.prompt)
    return Event(pref_id, [OutgoingRecord(topics.PREFERENCES, key, record)])


def ranking_event(request: RankingRequest, api_key: ApiKey) -> Event:
    rank_id = event_id("rank", api_key, request.idempotency_key)
    key = prompt_hash(request.prompt)
    records = ranking_pairs(request.prompt, request.responses, rank_id)
    for record in records:
        _annotate(record, request)
    return Event(rank_id, [OutgoingRecord(topics.PREFERENCES, key, r) for r in records])


def _annotate(
    record: events_pb2.PreferenceRecord, request: PreferenceRequest | RankingRequest
) -> None:
    """The person's cohort, and the annotation-queue candidate answered (after the event id in
    `derived_from`: every gateway replica drops an answered candidate from its queue by it)."""
    record.cohort = request.cohort or ""
    if request.candidate_id is not None:
        record.derived_from.append(request.candidate_id)
