"""Writes events to Kafka and answers only once Kafka has them (acks=all), in bounded time.

`EventPublisher.publish` hands the records to the idempotent producer on a worker thread
(sending may block on metadata or a full buffer, never on the event loop), then awaits the
producer's acknowledgements through asyncio futures. If they do not all arrive within
`timeout_s`, it raises `PublishUnavailable` and the route answers 503 with Retry-After: the client
retries with the same idempotency key, and a late copy of the first attempt is recognised
downstream by its id. Nothing is acknowledged that Kafka has not acknowledged.

`RecentEvents` is the per-replica memory of idempotency keys: a key seen before answers with the
first event's id without writing again; two concurrent requests with one key share one write.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable

from kafka import KafkaProducer

from services.gateway.events import Event


class PublishUnavailable(Exception):
    """Kafka did not acknowledge within the bound; the request must be answered 503."""


class EventPublisher:
    def __init__(self, producer: KafkaProducer, timeout_s: float, executor: ThreadPoolExecutor):
        self.producer = producer
        self.timeout_s = timeout_s
        self.executor = executor

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
            raise PublishUnavailable(f"Kafka did not acknowledge: {exc!r}") from exc


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
