"""Writes events to Kafka and answers only once Kafka has them (acks=all), in bounded time.

The gateway's producer is librdkafka (confluent-kafka), not the kafka-python client the other
services use: feedback ingestion is the one hot path where the client's CPU per record decides
the throughput (kafka-python cost about 4 ms of CPU an event on this machine class, and a
gateway replica sustained a third of its no-op request rate; see bench/feedback_ingest.py).

`EventPublisher.publish` hands the records to the idempotent producer straight from the event
loop (`produce` only queues; it never blocks), then awaits their delivery reports, which a
poller thread serves and hands back to the loop. If they do not all arrive within `timeout_s`,
it raises `PublishUnavailable` and the route answers 503 with Retry-After: the client retries
with the same idempotency key, and a late copy of the first attempt is recognised downstream by
its id. Nothing is acknowledged that Kafka has not acknowledged.

A producer that hit a fatal error (an idempotent producer that can no longer guarantee order
and uniqueness) is replaced by a fresh one; its queued records fail (their clients got 503).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
from collections.abc import Awaitable, Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from services.common.schema import record_headers
from services.common.settings import KafkaSettings
from services.gateway.events import Event

log = logging.getLogger(__name__)


class PublishUnavailable(Exception):
    """Kafka did not acknowledge within the bound; the request must be answered 503."""


def make_producer(settings: KafkaSettings, **overrides) -> Producer:
    """An idempotent librdkafka producer that waits for all in-sync replicas (acks=all), with
    the deployment's TLS and SASL settings (`KafkaSettings.librdkafka_config`)."""
    config = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": settings.delivery_timeout_ms,
        "request.timeout.ms": min(settings.request_timeout_ms, settings.delivery_timeout_ms),
        # Each request waits for its own record, so lingering only adds latency; records queued
        # while a produce request is in flight still go out together in the next one.
        "linger.ms": 0,
        "reconnect.backoff.max.ms": 1000,
        **settings.librdkafka_config(),
    }
    config.update(overrides)
    return Producer(config)


class EventPublisher:
    def __init__(
        self, make_producer: Callable[[], Producer], timeout_s: float, poll_s: float = 0.05
    ):
        self.make_producer = make_producer
        self.producer = make_producer()
        self.timeout_s = timeout_s
        self._fatal = False
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll, args=(poll_s,), name="kafka-poll", daemon=True
        )
        self._poller.start()

    def _poll(self, poll_s: float) -> None:
        """Serves delivery reports (their callbacks run on this thread) until closed."""
        while not self._stop.is_set():
            try:
                self.producer.poll(poll_s)
            except Exception:  # the poller must outlive any one report (its request got 503)
                log.exception("serving Kafka delivery reports failed")
                self._stop.wait(poll_s)

    async def publish(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                for record in event.records:
                    ack = loop.create_future()
                    self.producer.produce(
                        record.topic,
                        key=record.key.encode(),
                        value=record.value.SerializeToString(),
                        headers=record_headers(record.value),
                        on_delivery=functools.partial(self._delivered, loop, ack),
                    )
                    acks.append(ack)
                await asyncio.gather(*acks)
        except Exception as exc:  # a timeout, a full queue or a Kafka error: not acknowledged
            for ack in acks:
                ack.cancel()
            self._after_failure(exc)
            raise PublishUnavailable(f"Kafka did not acknowledge: {exc!r}") from exc

    def _delivered(
        self, loop: asyncio.AbstractEventLoop, ack: asyncio.Future, error, _message
    ) -> None:
        if error is not None and error.fatal():
            self._fatal = True
        if not loop.is_closed():
            loop.call_soon_threadsafe(_set, ack, error)

    def _after_failure(self, exc: Exception) -> None:
        if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
            self._fatal = self._fatal or exc.args[0].fatal()
        if not self._fatal:
            return
        old, self.producer = self.producer, self.make_producer()
        self._fatal = False
        log.warning("replaced a Kafka producer after a fatal error")
        old.purge()  # its records fail now (their clients got 503) instead of lingering
        old.flush(0)

    def close(self, timeout_s: float) -> None:
        """Stops the poller, then flushes what is queued (a late acknowledgement is not lost)."""
        self._stop.set()
        self._poller.join()
        remaining = self.producer.flush(timeout_s)
        if remaining:
            log.warning(
                "producer did not flush on close", extra={"fields": {"unflushed": remaining}}
            )


def _set(ack: asyncio.Future, error) -> None:
    if ack.done():
        return
    if error is not None:
        ack.set_exception(KafkaException(error))
    else:
        ack.set_result(None)


class RecentEvents:
    """Bounded map idempotency key -> event id of the first accepted event (LRU order)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._done: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._in_flight: dict[str, asyncio.Future] = {}

    async def once(
        self, scope_key: str | None, write: Callable[[], Awaitable[str]]
    ) -> tuple[str, bool]:
        """Runs `write` unless `scope_key` was accepted before; returns (event id, duplicate)."""
        if scope_key is None or self.capacity == 0:
            return await write(), False
        if scope_key in self._done:
            self._done.move_to_end(scope_key)
            return self._done[scope_key], True
        if scope_key in self._in_flight:
            return await asyncio.shield(self._in_flight[scope_key]), True
        first = asyncio.get_running_loop().create_future()
        self._in_flight[scope_key] = first
        try:
            event_id = await write()
        except BaseException as exc:
            first.set_exception(exc)
            first.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._in_flight[scope_key]
        first.set_result(event_id)
        self._done[scope_key] = event_id
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)
        return event_id, False
