"""The annotation queue on the real broker: candidates produced to rlhf.annotation-queue.v1 are
listed by real gateway processes in disagreement order; a ranking posted with a candidate id to
one replica removes the candidate from every replica (learnt from rlhf.preferences.v1); a
poison record goes to the dead-letter topic."""

from __future__ import annotations

import time
import uuid

import httpx
from kafka import KafkaConsumer, TopicPartition

from services.common import topics
from services.common.kafka import make_producer
from services.genproto.rlhf.v1 import common_pb2, events_pb2
from tests.integration.gateway.gateway_process import running_gateway

DISAGREEMENTS = [0.12, 0.47, 0.05, 0.33]


def _queued(gw, mine: set[str]) -> list[str]:
    reply = httpx.get(f"{gw.url}/v1/annotation-queue?limit=100", headers=gw.headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return [c["candidate_id"] for c in reply.json()["candidates"] if c["candidate_id"] in mine]


def _until(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def _dead_letters(kafka_settings, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers)
    try:
        tp = TopicPartition(topics.dlq_topic(topic), 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        found, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline:
            found += consumer.poll(timeout_ms=300).get(tp, [])
        return found
    finally:
        consumer.close()


def test_queue_in_disagreement_order_and_a_ranking_removes_it_everywhere(kafka_settings, run_dir):
    run = uuid.uuid4().hex[:8]
    candidates = [
        events_pb2.AnnotationCandidate(
            candidate_id=f"cand-{run}-{i}",
            prompt=common_pb2.Prompt(text=f"Which is kinder? ({run} {i})"),
            prompt_text=f"Which is kinder? ({run} {i})",
            responses=[f"answer {i}a", f"answer {i}b", f"answer {i}c"],
            response_ids=[f"r-{run}-{i}-{k}" for k in "abc"],
            disagreement=d,
            reason="ensemble",
            reward_model_version=3,
        )
        for i, d in enumerate(DISAGREEMENTS)
    ]
    mine = {c.candidate_id for c in candidates}
    expected = [c.candidate_id for c in sorted(candidates, key=lambda c: -c.disagreement)]
    producer = make_producer(kafka_settings)
    poison = producer.send(
        topics.ANNOTATION_QUEUE, key=f"poison-{run}", value=b"\xff\xfe not a candidate"
    ).get(timeout=30)
    for c in candidates:
        producer.send(topics.ANNOTATION_QUEUE, key=c.candidate_id, value=c).get(timeout=30)
    producer.close()

    options = {"rate_limit_burst": 1000}
    with (
        running_gateway(kafka_settings, run_dir / "gateway", **options) as first,
        running_gateway(kafka_settings, run_dir / "gateway", **options) as second,
    ):
        for gw in (first, second):
            assert _until(lambda gw=gw: _queued(gw, mine) == expected), _queued(gw, mine)
        top = httpx.get(
            f"{first.url}/v1/annotation-queue?limit=100", headers=first.headers, timeout=10
        ).json()["candidates"]
        entry = next(c for c in top if c["candidate_id"] == expected[0])
        best = candidates[1]
        assert entry == {
            "candidate_id": best.candidate_id,
            "prompt": best.prompt_text,
            "responses": list(best.responses),
            "response_ids": list(best.response_ids),
            "disagreement": entry["disagreement"],
            "reason": "ensemble",
            "reward_model_version": 3,
        }
        assert abs(entry["disagreement"] - 0.47) < 1e-6

        ranking = {
            "prompt": entry["prompt"],
            "responses": entry["responses"][::-1],
            "candidate_id": entry["candidate_id"],
            "cohort": "vendor-b",
        }
        posted = httpx.post(
            f"{first.url}/v1/rankings", json=ranking, headers=first.headers, timeout=10
        )
        assert posted.status_code == 202, posted.text
        assert _queued(first, mine) == expected[1:]  # at once on the replica that took it
        # The other replica learns it from rlhf.preferences.v1.
        assert _until(lambda: _queued(second, mine) == expected[1:]), _queued(second, mine)

    letters = [
        r
        for r in _dead_letters(kafka_settings, topics.ANNOTATION_QUEUE)
        if dict(r.headers).get("dlq.source.offset") == str(poison.offset).encode()
    ]
    assert letters, "the poison candidate was not dead-lettered"
    headers = {k: v.decode() for k, v in letters[0].headers}
    assert headers["dlq.consumer"] == "gateway"
    assert headers["dlq.error"].startswith("DecodeError")
