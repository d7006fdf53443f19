"""The annotation queue: highest disagreement first, bounded, answered candidates gone (whether
the answer comes before or after the candidate), unusable records dead-lettered, and the HTTP
route with its auth. The real broker is in tests/integration/gateway/test_annotation_queue.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from services.common import topics
from services.gateway.annotation_queue import AnnotationQueue, QueueTail, answered_ids
from services.gateway.app import create_app
from services.gateway.auth import sha256_hex
from services.gateway.settings import GatewaySettings
from services.genproto.rlhf.v1 import common_pb2, events_pb2

KEY = "unit-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def candidate(cid: str, disagreement: float, **fields) -> events_pb2.AnnotationCandidate:
    defaults = {
        "prompt": common_pb2.Prompt(text=f"prompt of {cid}"),
        "prompt_text": f"prompt of {cid}",
        "responses": ["yes", "no"],
        "response_ids": [f"{cid}-a", f"{cid}-b"],
        "reason": "ensemble",
        "reward_model_version": 4,
    }
    return events_pb2.AnnotationCandidate(
        candidate_id=cid, disagreement=disagreement, **{**defaults, **fields}
    )


def test_highest_disagreement_first_within_the_capacity():
    queue = AnnotationQueue(capacity=3, answered_capacity=10)
    for cid, d in [("a", 0.1), ("b", 0.4), ("c", 0.05), ("d", 0.3), ("e", 0.2)]:
        queue.offer(candidate(cid, d))
    assert [c.candidate_id for c in queue.top(10)] == ["b", "d", "e"]
    assert [c.candidate_id for c in queue.top(2)] == ["b", "d"]
    assert len(queue) == 3
    # A newer copy of a queued id replaces it, at its new place.
    queue.offer(candidate("e", 0.9))
    assert [(c.candidate_id, c.disagreement) for c in queue.top(10)] == [
        ("e", pytest.approx(0.9)),
        ("b", pytest.approx(0.4)),
        ("d", pytest.approx(0.3)),
    ]


def test_answered_candidates_leave_and_stay_gone():
    queue = AnnotationQueue(capacity=10, answered_capacity=2)
    for cid, d in [("a", 0.5), ("b", 0.4), ("c", 0.3)]:
        queue.offer(candidate(cid, d))
    queue.answer(["a"])
    assert [c.candidate_id for c in queue.top(10)] == ["b", "c"]
    assert queue.offer(candidate("a", 0.5)) is False  # replayed after its answer
    queue.answer(["late"])  # answered before it is read
    assert queue.offer(candidate("late", 0.99)) is False
    assert [c.candidate_id for c in queue.top(10)] == ["b", "c"]
    queue.answer(["x", "y"])  # the answered memory is bounded: "a" and "late" are forgotten
    assert queue.offer(candidate("a", 0.5)) is True


def test_only_what_a_person_posted_answers_a_candidate():
    person = events_pb2.PreferenceRecord(
        source=events_pb2.PREFERENCE_SOURCE_ANNOTATION, derived_from=["rank-1", "cand-7"]
    )
    plain = events_pb2.PreferenceRecord(
        source=events_pb2.PREFERENCE_SOURCE_ANNOTATION, derived_from=["pref-1"]
    )
    live = events_pb2.PreferenceRecord(
        source=events_pb2.PREFERENCE_SOURCE_LIVE_FEEDBACK, derived_from=["r1", "r2"]
    )
    assert [answered_ids(r) for r in (person, plain, live)] == [["cand-7"], [], []]


class Letters:
    def __init__(self):
        self.sent = []

    def send_record(self, record, error):
        self.sent.append((record.topic, record.offset, str(error)))


def record(topic: str, offset: int, value: bytes):
    return SimpleNamespace(topic=topic, partition=0, offset=offset, value=value)


def test_the_tail_queues_answers_and_dead_letters_what_it_cannot_use():
    queue, letters = AnnotationQueue(10, 10), Letters()
    tail = QueueTail(None, queue, letters, lookback_s=60.0)
    q, p = topics.ANNOTATION_QUEUE, topics.PREFERENCES
    tail.handle(record(q, 0, candidate("a", 0.2).SerializeToString()))
    tail.handle(record(q, 1, candidate("b", 0.7).SerializeToString()))
    tail.handle(record(q, 2, b"\xff\xff not protobuf"))
    tail.handle(record(q, 3, candidate("", 0.9).SerializeToString()))
    tail.handle(record(q, 4, candidate("one", 0.9, responses=["only"]).SerializeToString()))
    tail.handle(record(p, 9, b"\x0a\xff"))
    answer = events_pb2.PreferenceRecord(
        source=events_pb2.PREFERENCE_SOURCE_ANNOTATION, derived_from=["rank-x", "b"]
    )
    tail.handle(record(p, 10, answer.SerializeToString()))
    assert [c.candidate_id for c in queue.top(10)] == ["a"]
    assert [(t, o) for t, o, _ in letters.sent] == [(q, 2), (q, 3), (q, 4), (p, 9)]
    assert "without candidate_id" in letters.sent[1][2]
    assert "fewer than 2 responses" in letters.sent[2][2]


class Publisher:
    """Stands in for Kafka in this unit test: every event is acknowledged."""

    def __init__(self):
        self.events = []

    async def publish(self, event):
        self.events.append(event)


@pytest.fixture()
def client() -> TestClient:
    settings = GatewaySettings(api_key_sha256=[sha256_hex(KEY)], rate_limit_burst=1000)
    app = create_app(settings)  # not entered: no lifespan, no Kafka, no tail
    app.state.publisher = Publisher()
    return TestClient(app)


def test_the_route_lists_the_queue_and_a_ranking_answers_it(client):
    queue = client.app.state.annotation_queue
    for cid, d in [("low", 0.1), ("high", 0.8), ("mid", 0.4)]:
        queue.offer(candidate(cid, d))
    assert client.get("/v1/annotation-queue").status_code == 401
    assert client.get("/v1/annotation-queue?limit=0", headers=AUTH).status_code == 422
    body = client.get("/v1/annotation-queue?limit=2", headers=AUTH).json()
    assert body["queued"] == 3
    assert [c["candidate_id"] for c in body["candidates"]] == ["high", "mid"]
    assert body["candidates"][0] == {
        "candidate_id": "high",
        "prompt": "prompt of high",
        "responses": ["yes", "no"],
        "response_ids": ["high-a", "high-b"],
        "disagreement": pytest.approx(0.8),
        "reason": "ensemble",
        "reward_model_version": 4,
    }
    ranking = {"prompt": "prompt of high", "responses": ["no", "yes"], "candidate_id": "high"}
    assert client.post("/v1/rankings", json=ranking, headers=AUTH).status_code == 202
    (event,) = client.app.state.publisher.events
    assert list(event.records[0].value.derived_from) == [event.event_id, "high"]
    body = client.get("/v1/annotation-queue", headers=AUTH).json()
    assert [c["candidate_id"] for c in body["candidates"]] == ["mid", "low"]
