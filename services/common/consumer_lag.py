"""Consumer lag: `rlhf_kafka_consumer_lag{group,topic,partition}`, the records on a partition
past its group's committed offset (end offset - committed offset), as Kafka's own
`kafka-consumer-groups.sh --describe` counts it.

How it stays current, with no change to the services that consume:
  1. every group consumer commits through `services.common.kafka.commit`, which hands the offsets
     it just committed to `LAG.observe`: one ListOffsets request for their end offsets;
  2. the shared worker loop (`services.common.worker.run_cycles`) calls `LAG.refresh` between
     cycles, at most every `REFRESH_INTERVAL_S`, so a consumer whose cycles fail and that commits
     nothing still shows its lag growing;
  3. `services.common.metrics.serve_metrics` registers `LAG` on the registry it serves.

Both calls run on the consumer's own thread (a KafkaConsumer is not thread-safe); the scrape only
reads the table. A partition the consumer no longer holds after a rebalance leaves the table, so
each partition is reported by the one process that owns it. Lag is best effort: a broker that
does not answer leaves the last value and logs, and never fails the caller's commit.

The table is per process: the registry a service serves is not reachable from the commit deep in
common code, and a deployed process runs one service. Tests that run several consumers in one
process see all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from kafka import TopicPartition
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

METRIC = "rlhf_kafka_consumer_lag"
REFRESH_INTERVAL_S = 15.0
"""Least time between two `refresh` calls' broker round trips for one consumer."""


def group_of(consumer) -> str | None:
    """The consumer's group id, or None for a consumer outside any group (it commits nothing)."""
    config = getattr(consumer, "config", None)
    return config.get("group_id") if isinstance(config, Mapping) else None


class ConsumerLag(Collector):
    """The lag table, exported as one gauge family."""

    def __init__(self, clock=time.monotonic):
        self._lag: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()
        self._last_refresh: dict[int, float] = {}
        self._clock = clock

    def observe(self, consumer, committed: Mapping[TopicPartition, int]) -> None:
        """Step 1: lag of the partitions whose next offsets `committed` were just committed."""
        group = group_of(consumer)
        if not group or not committed:
            return
        try:
            ends = consumer.end_offsets(list(committed))
            assigned = set(consumer.assignment())
        except Exception as exc:  # noqa: BLE001 - lag is best effort, the commit already happened
            log.warning("consumer lag not measured", extra={"fields": {"error": repr(exc)}})
            return
        self._update(group, {tp: ends[tp] - off for tp, off in committed.items()}, assigned)

    def refresh(self, consumer, force: bool = False) -> None:
        """Step 2: lag of every partition the consumer holds, from the group's committed
        offsets (a partition never committed counts from its first offset)."""
        group = group_of(consumer)
        if not group:
            return
        now = self._clock()
        last = self._last_refresh.get(id(consumer))
        if not force and last is not None and now - last < REFRESH_INTERVAL_S:
            return
        self._last_refresh[id(consumer)] = now
        try:
            assigned = set(consumer.assignment())
            if not assigned:
                self._update(group, {}, assigned)
                return
            ends = consumer.end_offsets(list(assigned))
            committed = {tp: consumer.committed(tp) for tp in assigned}
            never = [tp for tp, off in committed.items() if off is None]
            starts = consumer.beginning_offsets(never) if never else {}
        except Exception as exc:  # noqa: BLE001 - lag is best effort
            log.warning("consumer lag not refreshed", extra={"fields": {"error": repr(exc)}})
            return
        lag = {
            tp: ends[tp] - (off if off is not None else starts[tp]) for tp, off in committed.items()
        }
        self._update(group, lag, assigned)

    def _update(
        self, group: str, lag: Mapping[TopicPartition, int], assigned: Iterable[TopicPartition]
    ) -> None:
        held = {(tp.topic, tp.partition) for tp in assigned}
        with self._lock:
            for key in [k for k in self._lag if k[0] == group and (k[1], k[2]) not in held]:
                del self._lag[key]  # revoked: its new owner reports it
            for tp, value in lag.items():
                if (tp.topic, tp.partition) in held:
                    self._lag[(group, tp.topic, tp.partition)] = max(0, int(value))

    def value(self, group: str, topic: str, partition: int) -> int | None:
        with self._lock:
            return self._lag.get((group, topic, partition))

    def clear(self) -> None:
        with self._lock:
            self._lag.clear()
            self._last_refresh.clear()

    def collect(self):
        family = GaugeMetricFamily(
            METRIC,
            "Records on a partition past its consumer group's committed offset.",
            labels=["group", "topic", "partition"],
        )
        with self._lock:
            rows = sorted(self._lag.items())
        for (group, topic, partition), lag in rows:
            family.add_metric([group, topic, str(partition)], lag)
        yield family

    def describe(self):
        # Lets a registry check the name for clashes without collecting (and locking).
        yield GaugeMetricFamily(METRIC, "Records past the committed offset.", labels=["group"])


LAG = ConsumerLag()
"""The process's table (see the module docstring for why it is one per process)."""
