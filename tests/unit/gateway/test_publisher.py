"""EventPublisher against a stand-in producer (the real broker is in tests/integration/gateway):
202 only on every record's delivery report, 503 on an error or a timeout, and a producer that
hit a fatal error replaced by a fresh one, with its queued records purged."""

from __future__ import annotations

import asyncio
import threading

import pytest
from confluent_kafka import KafkaError

from services.gateway.auth import ApiKey
from services.gateway.events import ranking_event
from services.gateway.protocol import RankingRequest
from services.gateway.publisher import EventPublisher, PublishUnavailable

EVENT = ranking_event(
    RankingRequest(prompt="Q?", responses=["a", "b", "c"]), ApiKey("k")
)  # 3 records


class StandInProducer:
    """Records what is produced; answers each record with `outcome` when polled (None: no answer)."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.produced: list[tuple[str, bytes, bytes]] = []
        self.pending: list = []
        self.purged = False
        self.lock = threading.Lock()

    def produce(self, topic, key, value, on_delivery, headers=None):
        # Every record says what it holds (services/common/schema.py).
        assert dict(headers or [])["content-type"] == b"application/x-protobuf", headers
        with self.lock:
            self.produced.append((topic, key, value))
            self.pending.append(on_delivery)

    def poll(self, timeout):
        with self.lock:
            callbacks, self.pending = (
                (self.pending, []) if not isinstance(self.outcome, str) else ([], self.pending)
            )
        for callback in callbacks:
            callback(self.outcome, None)
        threading.Event().wait(min(timeout, 0.01))
        return len(callbacks)

    def purge(self):
        self.purged = True

    def flush(self, timeout=None):
        return 0


def publisher_with(*producers) -> EventPublisher:
    queue = list(producers)
    return EventPublisher(lambda: queue.pop(0), timeout_s=0.5, poll_s=0.01)


def test_acknowledged_only_after_every_record_is_delivered():
    producer = StandInProducer(outcome=None)
    publisher = publisher_with(producer)
    asyncio.run(publisher.publish(EVENT))
    publisher.close(1)
    assert [(t, k) for t, k, _ in producer.produced] == [
        (r.topic, r.key.encode()) for r in EVENT.records
    ]
    assert [v for _, _, v in producer.produced] == [
        r.value.SerializeToString() for r in EVENT.records
    ]


@pytest.mark.parametrize("outcome", ["silent", KafkaError(KafkaError._MSG_TIMED_OUT)])
def test_no_report_or_an_error_is_unavailable_and_keeps_the_producer(outcome):
    producer = StandInProducer(outcome)
    publisher = publisher_with(producer)
    with pytest.raises(PublishUnavailable):
        asyncio.run(publisher.publish(EVENT))
    publisher.close(1)
    assert publisher.producer is producer and not producer.purged


def test_a_fatal_error_replaces_the_producer():
    broken, fresh = (
        StandInProducer(KafkaError(KafkaError._FATAL, "fenced", fatal=True)),
        StandInProducer(None),
    )
    publisher = publisher_with(broken, fresh)
    with pytest.raises(PublishUnavailable):
        asyncio.run(publisher.publish(EVENT))
    assert publisher.producer is fresh and broken.purged
    asyncio.run(publisher.publish(EVENT))  # the fresh producer serves the next request
    publisher.close(1)
    assert len(fresh.produced) == len(EVENT.records)
