"""The broker stopped for `outage_s` and started again while feedback flows through a real
gateway process and rollouts through an idempotent producer, and a group consumer reads the
rollouts throughout. Every event acknowledged (HTTP 202, a producer ack) is in Kafka afterwards,
once (counted by id); the gateway, the producer and the consumer carry on without a restart.
"""

from __future__ import annotations

import time

import httpx

from bench.chaos_scenarios import ChaosEnv, Row, wait_for
from bench.chaos_scenarios.trainer import PARTITIONS, GroupProducer
from bench.workers import Workers
from services.common import topics
from services.common.kafka import decode, make_consumer
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import read_topic, running_gateway
from tests.integration.trainer.helpers import private_topic

CLIENTS = 3


class FeedbackClients(Workers):
    """`CLIENTS` threads posting thumbs to the gateway; `acked` holds the ids answered 202."""

    def __init__(self, gateway, run: str):
        self.gateway, self.run = gateway, run
        self.acked: list[str] = []
        self.refused = 0  # 503 + Retry-After: not acknowledged, the client may retry
        self.errors: list[str] = []
        super().__init__(threads=CLIENTS)

    def work(self, n: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self.stopping.is_set():
                body = {
                    "response_id": f"chaos-{self.run}-{n}-{i}",
                    "thumb": "up",
                    "idempotency_key": f"chaos-{self.run}-{n}-{i}",
                }
                try:
                    r = http.post(
                        f"{self.gateway.url}/v1/feedback", json=body, headers=self.gateway.headers
                    )
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                if r.status_code == 202:
                    self.acked.append(r.json()["id"])
                elif r.status_code == 503 and r.headers.get("retry-after"):
                    self.refused += 1
                else:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")
                i += 1
                time.sleep(0.02)


class GroupReader(Workers):
    """A group consumer reading `topic` the whole time; `seen` holds every rollout id it read."""

    def __init__(self, kafka, topic: str):
        self.consumer = make_consumer(kafka, f"chaos-reader-{topic}", [topic])
        self.seen: list[str] = []
        self.errors = 0
        super().__init__(join_timeout_s=30)

    def work(self, _n: int) -> None:
        while not self.stopping.is_set():
            try:
                for records in self.consumer.poll(timeout_ms=300).values():
                    self.seen += [decode(events_pb2.Rollout, r.value).rollout_id for r in records]
                self.consumer.commit()
            except Exception:  # noqa: BLE001 - the broker is away: the same consumer polls on
                self.errors += 1
                time.sleep(0.5)

    def close(self) -> None:
        self.consumer.close()


def broker_outage(env: ChaosEnv, outage_s: float = 20.0, outages: int = 1) -> Row:
    row = Row("broker stopped and restarted")
    run = f"{time.time_ns() % 10**9:09d}"
    topic = private_topic(env.kafka, PARTITIONS)
    with (
        running_gateway(
            env.kafka,
            env.folder("broker-outage"),
            publish_timeout_s=2,
            rate_limit_burst=100_000,
            rate_limit_per_s=100_000,
        ) as gateway,
        GroupReader(env.kafka, topic) as reader,
        FeedbackClients(gateway, run) as clients,
        GroupProducer(env.kafka, topic, f"outage-{run}-", every_s=0.2) as producer,
    ):
        try:
            for _ in range(outages):
                feedback, rollouts = len(clients.acked), len(producer.acked)
                row.check(
                    wait_for(lambda feedback=feedback: len(clients.acked) >= feedback + 20, 60)
                    and wait_for(lambda rollouts=rollouts: len(producer.acked) >= rollouts + 8, 60),
                    "feedback and rollouts flow before the outage",
                )
                env.broker.stop()
                row.injected += 1
                time.sleep(outage_s)
                env.broker.start()
                feedback, rollouts = len(clients.acked), len(producer.acked)
                row.check(
                    wait_for(lambda feedback=feedback: len(clients.acked) >= feedback + 20, 120),
                    "the gateway acknowledges feedback again, without a restart",
                )
                row.check(
                    wait_for(lambda rollouts=rollouts: len(producer.acked) >= rollouts + 8, 120),
                    "the producer is acknowledged again, without a restart",
                )
        finally:
            if not env.broker.running:
                env.broker.start()
            producer.stop()
        acked_rollouts = set(producer.acked)
        row.check(
            wait_for(lambda: acked_rollouts <= set(reader.seen), 120),
            "the group consumer reads every acknowledged rollout, without a restart",
        )
    row.requests_failed = clients.refused + producer.failed + len(clients.errors)
    row.check(not clients.errors, f"feedback answered only 202 or 503: {clients.errors[:3]}")
    acked_feedback = set(clients.acked)
    stored = read_topic(
        env.kafka,
        topics.FEEDBACK,
        events_pb2.FeedbackEvent,
        lambda found: acked_feedback <= {e.feedback_id for e in found},
        timeout_s=90,
    )
    row.count(acked_feedback, [e.feedback_id for e in stored])
    row.count(
        acked_rollouts, [r.rollout_id for r in read_topic(env.kafka, topic, events_pb2.Rollout)]
    )
    row.notes.append(
        f"{len(acked_feedback)} feedback + {len(acked_rollouts)} rollouts acknowledged; "
        f"{clients.refused} feedback answered 503 + Retry-After, {producer.failed} sends timed "
        f"out (not acknowledged); reader poll errors during the outage: {reader.errors}"
    )
    return row
