"""A producer carries on after a broker outage longer than its delivery timeout, the case in
which kafka-python resets the idempotent producer id (services/common/kafka.py): every later
send is acknowledged again, and `close(timeout)` returns, with the session's real broker."""

from __future__ import annotations

import logging
import threading
import time

from bench.chaos_scenarios import wait_for
from services.common.kafka import make_producer
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.trainer.helpers import private_topic

PARTITIONS = 4
DELIVERY_TIMEOUT_MS = 5000


class Sender:
    """Sends small batches to every partition, without pause, until stopped."""

    def __init__(self, producer, topic: str):
        self.producer, self.topic = producer, topic
        self.acked = self.failed = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            futures = [
                self.producer.send(
                    self.topic,
                    key=f"k{i}-{p}",
                    value=events_pb2.Rollout(rollout_id=f"r{i}-{p}"),
                    partition=p,
                )
                for p in range(PARTITIONS)
            ]
            for future in futures:
                try:
                    future.get(timeout=DELIVERY_TIMEOUT_MS / 1000 + 5)
                    self.acked += 1
                except Exception:  # noqa: BLE001 - not acknowledged, counted
                    self.failed += 1
            i += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)


def test_a_producer_recovers_from_an_outage_longer_than_its_delivery_timeout(
    kafka_broker, kafka_settings, caplog
):
    topic = private_topic(kafka_settings, PARTITIONS)
    producer = make_producer(
        kafka_settings,
        delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
        request_timeout_ms=DELIVERY_TIMEOUT_MS - 1000,
    )
    sender = Sender(producer, topic)
    caplog.set_level(logging.WARNING, logger="services.common.kafka")
    resets = 0
    try:
        # The reset needs a batch the broker may have written to expire; whether one is in
        # flight when the broker goes is timing, so the outage repeats until one was (<= 4).
        for _ in range(4):
            assert wait_for(lambda: sender.acked > 0, 60), "sends are acknowledged at first"
            kafka_broker.stop()
            time.sleep(DELIVERY_TIMEOUT_MS / 1000 + 4)
            kafka_broker.start(create_topics=False)
            acked = sender.acked
            assert wait_for(lambda acked=acked: sender.acked >= acked + 20, 90), (
                f"sends are acknowledged again after the outage ({sender.failed} failed)"
            )
            resets = sum("asking for a new one" in r.getMessage() for r in caplog.records)
            if resets:
                break
    finally:
        if not kafka_broker.running:
            kafka_broker.start(create_topics=False)
        sender.stop()
        started = time.monotonic()
        producer.close(timeout=10)
        closed_s = time.monotonic() - started
    assert resets >= 1, "no outage expired a batch in flight: the reset path never ran"
    assert closed_s < 20
