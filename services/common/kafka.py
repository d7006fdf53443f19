"""Kafka producer, consumer and admin helpers with the platform's delivery rules built in.

Producers are idempotent with acks=all: a record is acknowledged only once every in-sync replica
has it, and retries never duplicate it. Consumers never auto-commit: the caller commits offsets
after the work those records feed is durable (see `commit`). Values are protobuf messages, and
every record says which one in its headers (`record_headers`): with the FileDescriptorSet that
ships in the package (`rlhf schema`), a consumer outside the platform can decode any topic.

Every client here connects with the security settings of `KafkaSettings` (TLS, mutual TLS, a
SASL login: `KafkaSettings.kafka_python_config`); a client built elsewhere must use them too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Self, TypeVar

from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
)
from kafka.producer.transaction_manager import TransactionManager, TransactionState
from kafka.serializer import Serializer

from services.common.consumer_lag import LAG
from services.common.schema import record_headers
from services.common.settings import KafkaSettings
from services.common.topics import TOPICS, TopicSpec

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def _reset_then_reinitialise(reset):
    """kafka-python 3.0.12's `reset_producer_id` (called when a batch the broker may have
    written expires, as in a broker outage longer than `delivery_timeout_ms`) clears the
    producer id but leaves an idempotent producer READY, and `init_producer_id` only starts from
    UNINITIALIZED: the sender then waits for an id it never asks for, and every later send and
    `flush` hangs. Kafka's Java client goes back to UNINITIALIZED here (KAFKA-7737), so the next
    sender turn asks for a new id; this does the same, and nothing once the library does it."""

    def reset_producer_id(self):
        reset(self)
        with self._lock:
            if not self.is_transactional() and self._current_state == TransactionState.READY:
                log.warning("Kafka producer id reset after an expired batch: asking for a new one")
                self._current_state = TransactionState.UNINITIALIZED

    reset_producer_id.__doc__ = reset.__doc__
    reset_producer_id.reinitialises = True
    return reset_producer_id


if not getattr(TransactionManager.reset_producer_id, "reinitialises", False):
    TransactionManager.reset_producer_id = _reset_then_reinitialise(
        TransactionManager.reset_producer_id
    )


class ProtobufProducer(KafkaProducer):
    """A KafkaProducer that adds `record_headers` to every record whose value is a message, and
    whose `close(timeout)` returns within about `timeout` even when records are unacknowledged
    (kafka-python's raises from its flush instead and leaves the sender running)."""

    def close(self, timeout=None, null_logger=False):
        try:
            super().close(timeout, null_logger)
            return
        except KafkaTimeoutError:
            log.warning("Kafka producer closing with records unacknowledged after %ss", timeout)
        # kafka-python's close raised from its flush before it stopped the sender: stop it now,
        # failing what is unacknowledged (their futures raise; nothing was acknowledged).
        sender = getattr(self, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(5)
        self._closed = True

    def send(self, topic, value=None, key=None, headers=None, **kwargs):
        if isinstance(value, Message):
            headers = [*record_headers(value), *(headers or [])]
        return super().send(topic, value=value, key=key, headers=headers, **kwargs)


def make_producer(settings: KafkaSettings, **overrides) -> KafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (acks=all)."""
    config = {
        "bootstrap_servers": settings.servers,
        "client_id": settings.client_id,
        "acks": "all",
        "enable_idempotence": True,
        # Idempotence keeps order and uniqueness with up to 5 requests in flight.
        "max_in_flight_requests_per_connection": 5,
        # The client insists on delivery_timeout >= linger + request timeout.
        "request_timeout_ms": min(settings.request_timeout_ms, settings.delivery_timeout_ms - 10),
        "delivery_timeout_ms": settings.delivery_timeout_ms,
        "linger_ms": 2,
        "key_serializer": KeySerializer(),
        "value_serializer": ProtobufSerializer(),
        **settings.kafka_python_config(),
    }
    config.update(overrides)
    return ProtobufProducer(**config)


def make_consumer(
    settings: KafkaSettings, group_id: str, topics: Iterable[str] = (), **overrides
) -> KafkaConsumer:
    """A group consumer with manual commits, starting from the earliest unread offset."""
    config = {
        "bootstrap_servers": settings.servers,
        "client_id": settings.client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "request_timeout_ms": max(settings.request_timeout_ms, 40_000),
        # Only records of committed transactions (and all non-transactional ones).
        "isolation_level": "read_committed",
        **settings.kafka_python_config(),
    }
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    topics = list(topics)
    if topics:
        consumer.subscribe(topics)
    return consumer


def commit(consumer: KafkaConsumer, next_offsets: dict[TopicPartition, int]) -> None:
    """Commits, for each partition, the offset of the next record to read.

    Call it only after the effect of every record before those offsets is durable.
    """
    if next_offsets:
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in next_offsets.items()})
        LAG.observe(consumer, next_offsets)  # rlhf_kafka_consumer_lag of what was committed


def decode(message_type: type[M], value: bytes) -> M:
    """Parses a record value into `message_type`; raises `DecodeError` on garbage."""
    msg = message_type()
    msg.ParseFromString(value)
    return msg


def ensure_topics(
    settings: KafkaSettings,
    specs: Iterable[TopicSpec] = TOPICS,
    replication_factor: int | None = None,
) -> list[str]:
    """Creates the missing topics; returns the names it created. Existing topics are kept (see
    `check_topics`). Replicas default to min(3, brokers in the cluster)."""
    admin = connect_admin(settings)
    try:
        existing = set(admin.list_topics())
        if replication_factor is None:
            replication_factor = min(3, len(admin.describe_cluster()["brokers"]))
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=replication_factor,
                topic_configs=s.configs,
            )
            for s in specs
            if s.name not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in new]
    finally:
        admin.close()


def check_topics(settings: KafkaSettings, specs: Iterable[TopicSpec] = TOPICS) -> list[str]:
    """One line per way the cluster's topics differ from `specs`: missing, another partition
    count, a config not set to the table's value. Empty when all are right. Nothing is changed:
    a keyed topic's partition count is its data's layout, so fixing it is a person's decision."""
    specs = list(specs)
    admin = connect_admin(settings)
    try:
        described = {t["name"]: t for t in admin.describe_topics([s.name for s in specs])}
        present = [s for s in specs if described[s.name]["error_code"] == 0]
        configs = (
            admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in present]
            )["topic"]
            if present
            else {}
        )
    finally:
        admin.close()
    problems = []
    for spec in specs:
        if spec not in present:
            problems.append(f"{spec.name}: missing")
            continue
        partitions = len(described[spec.name]["partitions"])
        if partitions != spec.partitions:
            problems.append(
                f"{spec.name}: {partitions} partitions, the table says {spec.partitions}"
            )
        have = configs.get(spec.name, {})
        for key, want in spec.configs.items():
            value = have.get(key, {}).get("value")
            if value != want:
                problems.append(f"{spec.name}: {key}={value}, the table says {want}")
    return problems


def connect_admin(settings: KafkaSettings, timeout_s: float = 60.0) -> KafkaAdminClient:
    """An admin client, retried until the cluster answers or `timeout_s` passes (at least one
    try of a second). The TimeoutError then says why connections failed, as far as kafka-python
    logged it: a refused login or TLS handshake reads better than silence."""
    deadline = time.monotonic() + timeout_s
    with _ConnectionFailures() as failures:
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            try:
                return KafkaAdminClient(
                    bootstrap_servers=settings.servers,
                    client_id=f"{settings.client_id}-admin",
                    request_timeout_ms=settings.request_timeout_ms,
                    bootstrap_timeout_ms=min(max(left_ms, 1_000), 30_000),
                    **settings.kafka_python_config(),
                )
            except KafkaError as exc:
                if time.monotonic() > deadline:
                    reason = failures.reason(settings)
                    raise TimeoutError(
                        f"Kafka at {settings.bootstrap_servers} ({settings.security_protocol}) "
                        f"did not answer in {timeout_s:g}s" + (f": {reason}" if reason else "")
                    ) from (failures.refused_login or failures.last or exc)
                time.sleep(0.5)


class _ConnectionFailures(logging.Handler):
    """Collects why kafka-python's bootstrap connections failed, from its WARNING records (on
    unless the `kafka` logger is set higher; services/common/logging.py keeps it at WARNING),
    while installed: its clients retry a refused login or handshake until their bootstrap
    timeout and then raise only the timeout."""

    _logger = logging.getLogger("kafka.net.manager")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.refused_login: SaslAuthenticationFailedError | None = None
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, SaslAuthenticationFailedError):
                self.refused_login = arg
            # KafkaTimeoutError is the summary ("Unable to bootstrap"), not a reason.
            elif isinstance(arg, BaseException) and not isinstance(arg, KafkaTimeoutError):
                self.last = arg

    def reason(self, settings: KafkaSettings) -> str:
        if self.refused_login is not None:
            return f"the broker refused the SASL login ({self.refused_login})"
        if self.last is None:
            return ""
        if settings.uses_sasl and "socket disconnected" in str(self.last):
            # A broker answers a refused login and closes the connection at once; kafka-python
            # drops a response that arrives together with the close, so mostly it sees only this.
            return (
                "the broker closed the connection, as it does on a refused SASL login (check "
                "RLHF_KAFKA_SASL_USERNAME, RLHF_KAFKA_SASL_PASSWORD, RLHF_KAFKA_SASL_MECHANISM)"
            )
        text = str(self.last)
        return text if type(self.last).__name__ in text else f"{type(self.last).__name__}: {text}"

    def __enter__(self) -> Self:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self._logger.removeHandler(self)


class KeySerializer(Serializer):
    """Keys are ids (response id, rollout id, prompt hash): UTF-8 text."""

    def serialize(self, topic, headers, data: str | bytes | None) -> bytes | None:
        if data is None or isinstance(data, bytes):
            return data
        return data.encode()


class ProtobufSerializer(Serializer):
    """Values are protobuf messages (already-encoded bytes pass through)."""

    def serialize(self, topic, headers, data: Message | bytes) -> bytes:
        if isinstance(data, bytes):
            return data
        return data.SerializeToString()
