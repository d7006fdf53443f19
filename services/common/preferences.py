"""Pure functions that turn judgements into `PreferenceRecord`s for `rlhf.preferences.v1`.

Used by the curator (live thumbs joined with their generations) and by the gateway (pairwise
preferences and rankings posted directly). Every record id is derived from what it was made of,
so a record produced twice after a crash or a client retry has the same `preference_id` and the
reward trainer stores it once. Records are keyed by `prompt_hash(prompt)`, so all the data about
one prompt lands in one partition, in order.
"""

from __future__ import annotations

import hashlib
import itertools
import time

from google.protobuf.timestamp_pb2 import Timestamp

from services.genproto.rlhf.v1 import common_pb2, events_pb2

Source = events_pb2.PreferenceSource


def prompt_hash(prompt: str) -> str:
    """The Kafka key of a prompt's preference records: 32 hex chars of its sha256."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def derived_id(kind: str, *parts: str) -> str:
    """A stable id for a record derived from `parts` (ids or texts)."""
    digest = hashlib.sha256("\x1f".join((kind, *parts)).encode()).hexdigest()[:32]
    return f"{kind}-{digest}"


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def _record(
    prompt: str,
    conversation: common_pb2.Prompt | None,
    source: int,
    derived_from: list[str],
    preference_id: str,
    **kind,
) -> events_pb2.PreferenceRecord:
    """`conversation` is the prompt as asked; a prompt posted as text is its own conversation."""
    return events_pb2.PreferenceRecord(
        preference_id=preference_id,
        prompt=prompt,
        conversation=conversation or common_pb2.Prompt(text=prompt),
        source=source,
        derived_from=derived_from,
        created_at=_now(),
        **kind,
    )


def pair_record(
    prompt: str,
    chosen: str,
    rejected: str,
    source: int,
    derived_from: list[str],
    preference_id: str,
    conversation: common_pb2.Prompt | None = None,
) -> events_pb2.PreferenceRecord:
    pair = events_pb2.PairwisePreference(chosen=chosen, rejected=rejected)
    return _record(prompt, conversation, source, derived_from, preference_id, pair=pair)


def label_record(
    prompt: str,
    completion: str,
    desirable: bool,
    source: int,
    derived_from: list[str],
    preference_id: str,
    conversation: common_pb2.Prompt | None = None,
) -> events_pb2.PreferenceRecord:
    label = events_pb2.BinaryLabel(completion=completion, desirable=desirable)
    return _record(prompt, conversation, source, derived_from, preference_id, label=label)


def ranking_pairs(
    prompt: str,
    ranked: list[str],
    event_id: str,
    source: int = Source.PREFERENCE_SOURCE_ANNOTATION,
    conversation: common_pb2.Prompt | None = None,
) -> list[events_pb2.PreferenceRecord]:
    """All K(K-1)/2 (better, worse) pairs of a ranking given best first."""
    if len(ranked) < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {len(ranked)}")
    return [
        pair_record(
            prompt,
            ranked[i],
            ranked[j],
            source,
            [event_id],
            derived_id("pair", event_id, str(i), str(j)),
            conversation,
        )
        for i, j in itertools.combinations(range(len(ranked)), 2)
    ]


def thumb_desirable(thumb: int, rating: int) -> bool | None:
    """True for thumbs up or a 4-5 rating, False for thumbs down or 1-2, None for a neutral 3."""
    if thumb == events_pb2.THUMB_UP:
        return True
    if thumb == events_pb2.THUMB_DOWN:
        return False
    if rating >= 4:
        return True
    if 1 <= rating <= 2:
        return False
    return None
