"""The broker stops while clients post feedback: every event answered 202 is in Kafka after the
broker returns, and every other request was answered 503 with Retry-After (never a silent drop)."""

from __future__ import annotations

import threading
import time
import uuid

import httpx

from services.common import topics
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import read_topic, running_gateway

CLIENTS = 3


def test_acknowledged_feedback_survives_a_broker_outage(kafka_broker, kafka_settings, run_dir):
    run = uuid.uuid4().hex[:8]
    answers: list[tuple[int, str | None, str | None]] = []  # (status, feedback id, Retry-After)
    stop = threading.Event()

    def client(n: int, url: str, headers: dict[str, str]) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not stop.is_set():
                body = {
                    "response_id": f"outage-{run}-{n}-{i}",
                    "thumb": "down",
                    "idempotency_key": f"{run}-{n}-{i}",
                }
                r = http.post(f"{url}/v1/feedback", json=body, headers=headers)
                answers.append(
                    (
                        r.status_code,
                        r.json().get("id") if r.status_code == 202 else None,
                        r.headers.get("retry-after"),
                    )
                )
                i += 1

    def count(code: int) -> int:
        return sum(1 for a in answers if a[0] == code)

    try:
        with running_gateway(
            kafka_settings,
            run_dir / "gateway",
            publish_timeout_s=2,
            rate_limit_burst=100_000,
            rate_limit_per_s=100_000,
        ) as gw:
            threads = [
                threading.Thread(target=client, args=(n, gw.url, gw.headers))
                for n in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            _wait(lambda: count(202) >= 20, 30, "accepted feedback before the outage")
            kafka_broker.stop()
            before_outage = count(202)
            _wait(lambda: count(503) >= 6, 60, "503 answers while the broker is down")
            kafka_broker.start()
            _wait(
                lambda: count(202) >= before_outage + 20, 90, "accepted feedback after the outage"
            )
            stop.set()
            for t in threads:
                t.join(timeout=60)
    finally:
        stop.set()
        if not kafka_broker.running:
            kafka_broker.start()

    assert {a[0] for a in answers} == {202, 503}, {a[0] for a in answers}
    assert all(a[2] is not None and int(a[2]) >= 1 for a in answers if a[0] == 503)
    acked = {a[1] for a in answers if a[0] == 202}
    stored = read_topic(
        kafka_settings,
        topics.FEEDBACK,
        events_pb2.FeedbackEvent,
        lambda found: acked <= {e.feedback_id for e in found},
        timeout_s=90,
    )
    missing = acked - {e.feedback_id for e in stored}
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged events are not in Kafka"


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s}s")
        time.sleep(0.1)
