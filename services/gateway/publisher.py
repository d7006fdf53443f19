"""Writes events to Kafka and answers only once Kafka has them (acks=all), in bounded time.

`EventPublisher.publish` hands the records to the idempotent producer on a worker thread
(sending may block on metadata or a full buffer, never on the event loop), then awaits the
producer's acknowledgements through asyncio futures. If they do not all arrive within
`timeout_s`, it raises `PublishUnavailable` and the route answers 503 with Retry-After: the client
retries with the same idempotency key, and a late copy of the first attempt is recognised
downstream by its id. Nothing is acknowledged that Kafka has not acknowledged.

A producer that keeps failing after Kafka is back (kafka-python's idempotent producer can stay
stuck re-initialising its producer id after batches expired during an outage) is replaced by a
fresh one once failures have lasted `reset_after_s` with no success; the old one is closed
without waiting, which fails its unacknowledged records (their clients already got 503).

`RecentEvents` is the per-replica memory of idempotency keys: a key seen before answers with the
first event's id without writing again; two concurrent requests with one key share one write.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from kafka import KafkaProducer

from services.gateway.events import Event

log = logging.getLogger(__name__)


class PublishUnavailable(Exception):
    """Kafka did not acknowledge within the bound; the request must be answered 503."""


class EventPublisher:
    def __init__(self, make_producer: Callable[[], KafkaProducer], timeout_s: float,
                 executor: ThreadPoolExecutor, reset_after_s: float = 15.0):
        self.make_producer = make_producer
        self.producer = make_producer()
        self.timeout_s = timeout_s
        self.executor = executor
        self.reset_after_s = reset_after_s
        self._failing_since: float | None = None
        self._resetting = False

    def _send_all(self, event: Event, loop: asyncio.AbstractEventLoop) -> list[asyncio.Future]:
        acks: list[asyncio.Future] = []
        for record in event.records:
            ack = loop.create_future()
            kafka_future = self.producer.send(record.topic, key=record.key, value=record.value)
            kafka_future.add_callback(_resolve, loop, ack)
            kafka_future.add_errback(_resolve_error, loop, ack)
            acks.append(ack)
        return acks

    async def publish(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                acks = await loop.run_in_executor(self.executor, self._send_all, event, loop)
                await asyncio.gather(*acks)
        except Exception as exc:  # a timeout or a Kafka error: either way, not acknowledged
            await self._after_failure()
            raise PublishUnavailable(f"Kafka did not acknowledge: {exc!r}") from exc
        self._failing_since = None

    async def _after_failure(self) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            return
        if self._resetting or now - self._failing_since < self.reset_after_s:
            return
        self._resetting = True
        loop = asyncio.get_running_loop()
        try:
            fresh = await loop.run_in_executor(self.executor, self.make_producer)
        except Exception as exc:  # Kafka still unreachable: keep the old producer, try later
            log.warning("producer reset failed", extra={"fields": {"error": repr(exc)}})
            self._failing_since = now
            return
        finally:
            self._resetting = False
        old, self.producer = self.producer, fresh
        self._failing_since = None
        log.warning("replaced a Kafka producer that kept failing")
        loop.run_in_executor(self.executor, _close_now, old)

    def close(self, timeout_s: float) -> None:
        """Flushes what is buffered (a late acknowledgement is not lost), then closes."""
        try:
            self.producer.close(timeout=timeout_s)
        except Exception as exc:
            log.warning("producer did not flush on close", extra={"fields": {"error": repr(exc)}})


def _close_now(producer: KafkaProducer) -> None:
    """Closes without waiting; its unacknowledged records fail (their clients got 503)."""
    try:
        producer.close(timeout=0)
    except Exception:
        # kafka-python's close() flushes first and raises on a timeout before force-closing its
        # sender thread; force it here so the stuck producer does not linger.
        if producer._sender is not None:
            producer._sender.force_close()
            producer._sender.join(5)


def _resolve(loop: asyncio.AbstractEventLoop, ack: asyncio.Future, _metadata) -> None:
    loop.call_soon_threadsafe(_set, ack, None, None)


def _resolve_error(loop: asyncio.AbstractEventLoop, ack: asyncio.Future, error) -> None:
    loop.call_soon_threadsafe(_set, ack, None, error)


def _set(ack: asyncio.Future, result, error) -> None:
    if ack.done():
        return
    if error is not None:
        ack.set_exception(error if isinstance(error, BaseException) else RuntimeError(str(error)))
    else:
        ack.set_result(result)


class RecentEvents:
    """Bounded map idempotency key -> event id of the first accepted event (LRU order)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._done: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._in_flight: dict[str, asyncio.Future] = {}

    async def once(self, scope_key: str | None, write: Callable[[], Awaitable[str]]) -> tuple[str, bool]:
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
