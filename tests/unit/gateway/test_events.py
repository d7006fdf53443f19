"""Requests -> Kafka records, and the per-replica idempotency memory."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from services.common import topics
from services.common.preferences import prompt_hash
from services.gateway.auth import ApiKey
from services.gateway.events import feedback_event, preference_event, ranking_event
from services.gateway.protocol import FeedbackRequest, PreferenceRequest, RankingRequest
from services.gateway.publisher import PublishUnavailable, RecentEvents
from services.genproto.rlhf.v1 import events_pb2

CALLER = ApiKey("abc123")


def test_feedback_event_is_keyed_by_response_id_with_a_stable_id():
    request = FeedbackRequest(
        response_id="resp-1",
        thumb="down",
        comment="wrong",
        categories=["facts"],
        idempotency_key="k-1",
    )
    event = feedback_event(request, CALLER)
    (record,) = event.records
    assert record.topic == topics.FEEDBACK and record.key == "resp-1"
    assert record.value.thumb == events_pb2.THUMB_DOWN and record.value.rating == 0
    assert record.value.feedback_id == event.event_id == feedback_event(request, CALLER).event_id
    assert (
        feedback_event(request, ApiKey("other")).event_id != event.event_id
    )  # keys are per caller
    no_key = FeedbackRequest(response_id="resp-1", rating=4)
    assert feedback_event(no_key, CALLER).event_id != feedback_event(no_key, CALLER).event_id


def test_ranking_of_k_gives_all_ordered_pairs():
    responses = ["best", "good", "fair", "worst"]
    event = ranking_event(
        RankingRequest(prompt="Q?", responses=responses, idempotency_key="r"), CALLER
    )
    pairs = [(r.value.pair.chosen, r.value.pair.rejected) for r in event.records]
    assert pairs == list(itertools.combinations(responses, 2))
    assert len(pairs) == 6
    assert {r.topic for r in event.records} == {topics.PREFERENCES}
    assert {r.key for r in event.records} == {prompt_hash("Q?")}
    assert len({r.value.preference_id for r in event.records}) == 6
    again = ranking_event(
        RankingRequest(prompt="Q?", responses=responses, idempotency_key="r"), CALLER
    )
    assert [r.value.preference_id for r in again.records] == [
        r.value.preference_id for r in event.records
    ]


def test_preference_event_is_one_pair():
    event = preference_event(PreferenceRequest(prompt="p", chosen="a", rejected="b"), CALLER)
    (record,) = event.records
    assert record.value.WhichOneof("kind") == "pair"
    assert (record.value.pair.chosen, record.value.pair.rejected) == ("a", "b")
    assert record.value.source == events_pb2.PREFERENCE_SOURCE_ANNOTATION


def test_cohort_and_answered_candidate_are_on_every_record():
    (feedback,) = feedback_event(
        FeedbackRequest(response_id="r", thumb="up", cohort="de-DE"), CALLER
    ).records
    assert feedback.value.cohort == "de-DE"
    assert (
        feedback_event(FeedbackRequest(response_id="r", rating=1), CALLER).records[0].value.cohort
        == ""
    )
    ranking = ranking_event(
        RankingRequest(
            prompt="Q?", responses=["a", "b", "c"], cohort="vendor-7", candidate_id="cand-1"
        ),
        CALLER,
    )
    assert [r.value.cohort for r in ranking.records] == ["vendor-7"] * 3
    assert [list(r.value.derived_from) for r in ranking.records] == [
        [ranking.event_id, "cand-1"]
    ] * 3
    pref = preference_event(
        PreferenceRequest(prompt="p", chosen="a", rejected="b", candidate_id="cand-2"), CALLER
    )
    (record,) = pref.records
    assert list(record.value.derived_from) == [pref.event_id, "cand-2"]
    assert record.value.cohort == ""


def test_recent_events_write_once_and_share_in_flight_writes():
    async def scenario():
        recent = RecentEvents(capacity=2)
        writes = []

        async def write(event_id: str) -> str:
            writes.append(event_id)
            await asyncio.sleep(0.01)
            return event_id

        together = await asyncio.gather(
            recent.once("k1", lambda: write("e1")), recent.once("k1", lambda: write("e1-again"))
        )
        assert together == [("e1", False), ("e1", True)]
        assert await recent.once("k1", lambda: write("e1-later")) == ("e1", True)
        await recent.once("k2", lambda: write("e2"))
        await recent.once("k3", lambda: write("e3"))  # evicts k1 (capacity 2)
        assert await recent.once("k1", lambda: write("e1-evicted")) == ("e1-evicted", False)
        assert writes == ["e1", "e2", "e3", "e1-evicted"]

        async def failing() -> str:
            raise PublishUnavailable("down")

        with pytest.raises(PublishUnavailable):
            await recent.once("k9", failing)
        assert await recent.once("k9", lambda: write("e9")) == ("e9", False)  # failures not cached

    asyncio.run(scenario())
