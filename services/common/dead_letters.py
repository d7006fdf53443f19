"""Dead letters: a record a consumer cannot use goes to `<topic>.dlq`, counted, and the consumer
moves on. Nothing else is ever skipped: a record is used, recognised as a duplicate (counted),
or dead-lettered.

The dead letter is the record as it was (key, value, headers) plus headers that say where it
came from and why: `dlq.source.topic`, `dlq.source.partition`, `dlq.source.offset`, `dlq.error`,
`dlq.consumer`. `send` returns once Kafka acknowledged it, so a consumer that dead-letters before
it commits an offset never loses the record: it is either still unread or in the DLQ. Each
counts in `rlhf_dlq_records_total{topic,consumer}`, and is logged (without its value).
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaProducer
from prometheus_client import CollectorRegistry, Counter

from services.common.settings import KafkaSettings
from services.common.topics import DLQ_RETENTION_MS, TopicSpec, dlq_topic

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000


class DeadLetters:
    """One consumer's dead-letter sender (its producer starts on the first dead letter)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        consumer: str,
        registry: CollectorRegistry | None = None,
        producer: KafkaProducer | None = None,
    ):
        self.kafka = kafka
        self.consumer = consumer
        self._producer = producer
        self._owns_producer = producer is None
        self._lock = threading.Lock()
        self._ensured: set[str] = set()
        self.records = Counter(
            "rlhf_dlq_records_total",
            "Records a consumer could not use, sent to <topic>.dlq, by source topic and consumer.",
            ["topic", "consumer"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    @property
    def producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                from services.common.kafka import make_producer

                self._producer = make_producer(self.kafka)
            return self._producer

    def send(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: str | BaseException,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Writes the dead letter and waits for its acknowledgement."""
        self._ensure(dlq_topic(topic))
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        why = why[:MAX_ERROR_CHARS]
        extra = [
            ("dlq.source.topic", topic.encode()),
            ("dlq.source.partition", str(partition).encode()),
            ("dlq.source.offset", str(offset).encode()),
            ("dlq.error", why.encode()),
            ("dlq.consumer", self.consumer.encode()),
        ]
        self.producer.send(
            dlq_topic(topic), key=key, value=value or b"", headers=[*(headers or []), *extra]
        ).get(timeout=self.kafka.delivery_timeout_ms / 1000)
        self.records.labels(topic, self.consumer).inc()
        log.warning(
            "record dead-lettered",
            extra={
                "fields": {
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "error": why,
                    "dlq": dlq_topic(topic),
                }
            },
        )

    def _ensure(self, name: str) -> None:
        """The table's DLQ topics exist already (`rlhf topics ensure`); one of another topic (a
        test's, a renamed one) is created here, through the Admin API, once."""
        if name in self._ensured:
            return
        from services.common.kafka import ensure_topics

        ensure_topics(self.kafka, [TopicSpec(name, 1, {"retention.ms": DLQ_RETENTION_MS})])
        self._ensured.add(name)

    def send_record(self, record, error: str | BaseException) -> None:
        """`send` for a kafka-python ConsumerRecord."""
        self.send(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            error,
            list(record.headers or []),
        )

    def close(self) -> None:
        with self._lock:
            if self._producer is not None and self._owns_producer:
                self._producer.close(timeout=10)
            self._producer = None
