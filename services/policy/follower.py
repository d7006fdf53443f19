"""Catch-up from `rlhf.weights.v1`: a replica that missed a push (it was down, or the trainer
could not reach it) installs the newest announced version of its model from the announced
folder, with the same checks as a push (services.policy.updates).

Every replica reads the whole (compacted, one record per model) topic from the beginning without
a consumer group: each one must see every announcement, and nothing is committed because the
served version, not an offset, says what has been applied.
"""

from __future__ import annotations

import logging
import threading

from google.protobuf.message import DecodeError
from kafka import TopicPartition

from services.common.dead_letters import DeadLetters
from services.common.kafka import decode, make_consumer
from services.common.settings import KafkaSettings
from services.common.topics import WEIGHTS
from services.genproto.rlhf.v1 import events_pb2
from services.policy.metrics import PolicyMetrics
from services.policy.updates import WeightsUpdater
from services.policy.weights import WeightsRejected

log = logging.getLogger(__name__)


class WeightsFollower:
    def __init__(
        self,
        kafka: KafkaSettings,
        model_names: set[str],
        updater: WeightsUpdater,
        metrics: PolicyMetrics,
    ):
        self.kafka = kafka
        self.model_names = model_names
        self.updater = updater
        self.metrics = metrics
        self.dead_letters = DeadLetters(kafka, "policy-weights-follower", metrics.registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="policy-weights-follower", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _dead_letter(self, record, error: Exception) -> None:
        """To rlhf.weights.v1.dlq. Every replica reads the topic from the start, so each may
        dead-letter the same record once per start: the dlq.source.* headers identify it."""
        try:
            self.dead_letters.send_record(record, error)
        except Exception:
            log.exception("could not dead-letter weights record at offset %s", record.offset)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.dead_letters.close()

    def handle(self, event: events_pb2.WeightsVersionEvent) -> None:
        if event.model not in self.model_names or event.weights_version <= self.updater.version:
            return
        try:
            version = self.updater.install_folder(event)
            self.metrics.weights_updates.labels("announcement", "accepted").inc()
            log.info("caught up to weights version %s from %s", version, event.location)
        except WeightsRejected as exc:
            self.metrics.weights_updates.labels("announcement", "refused").inc()
            log.warning("announced weights version %s refused: %s", event.weights_version, exc)

    def _run(self) -> None:
        consumer = make_consumer(self.kafka, group_id=None)
        try:
            partitions = None
            while partitions is None and not self._stop.is_set():
                partitions = consumer.partitions_for_topic(WEIGHTS)
                if partitions is None:
                    self._stop.wait(1.0)
            if partitions is None:
                return
            consumer.assign([TopicPartition(WEIGHTS, p) for p in sorted(partitions)])
            consumer.seek_to_beginning()
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        try:
                            event = decode(events_pb2.WeightsVersionEvent, record.value)
                        except DecodeError as err:  # never stops the follower
                            self._dead_letter(record, err)
                            continue
                        self.handle(event)
        except Exception:
            log.exception("weights follower stopped")
        finally:
            consumer.close()
