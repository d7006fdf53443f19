"""The curator: joins `rlhf.feedback.v1` with `rlhf.generations.v1` and emits
`rlhf.preferences.v1` (see `join.py` for what it emits). Run it with

    RLHF_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 RLHF_CURATOR_STATE_DIR=/var/lib/curator \
        python -m services.curator

Both inputs are keyed by response id with the same partition count, and the range assignor gives
partition p of both topics to the same member, so the join is partition-local. One cycle:
  1. poll a batch (generations first, so waiting feedback finds them);
  2. join it in one sqlite transaction of the state store;
  3. produce the preference records (idempotent, acks=all) and wait for every ack;
  4. store the next offsets and commit the sqlite transaction;
  5. commit the offsets to Kafka (the store's copy wins on restart; Kafka's is for monitoring).
A failure at 3 rolls the transaction back and rewinds the consumer to the batch's start.
A record that does not decode, or cannot be joined (no ids), goes to `<topic>.dlq` at 2 and is
acknowledged there before 4: it never stalls the cycle, and it is never lost.
The join state in the store covers the partitions this member holds; pairing of answers across
partitions is complete when one member holds all partitions (the default single replica).
"""

from __future__ import annotations

import logging
import threading
import time

from google.protobuf.message import DecodeError
from kafka import TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common import topics
from services.common.dead_letters import DeadLetters
from services.common.durable import SeekToStoredOffsets, durable_cycle
from services.common.kafka import decode, make_consumer, make_producer
from services.common.preferences import prompt_hash
from services.common.worker import run_cycles, serve
from services.curator.join import JoinCounts, JoinLimits, expire_waiting, on_feedback, on_generation
from services.curator.settings import CuratorSettings
from services.curator.store import JoinStore
from services.genproto.rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


class CuratorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.consumed = Counter(
            "rlhf_curator_records_consumed_total",
            "Records read, by topic.",
            ["topic"],
            registry=registry,
        )
        self.emitted = Counter(
            "rlhf_curator_preferences_emitted_total",
            "Preference records produced, by kind (pair or label).",
            ["kind"],
            registry=registry,
        )
        self.duplicates = Counter(
            "rlhf_curator_feedback_duplicate_total",
            "Feedback skipped: its id was joined before.",
            registry=registry,
        )
        self.expired = Counter(
            "rlhf_curator_feedback_expired_total",
            "Feedback that expired before its generation arrived.",
            registry=registry,
        )
        self.pending = Gauge(
            "rlhf_curator_feedback_pending",
            "Feedback waiting for its generation.",
            registry=registry,
        )


def read_record(topic: str, value: bytes):
    """A generation or a feedback event, decoded and checked; DecodeError or ValueError (the
    record goes to the DLQ) when it cannot be joined."""
    if topic == topics.GENERATIONS:
        gen = decode(events_pb2.GenerationRecord, value)
        if not gen.response_id:
            raise ValueError("generation record without response_id")
        return gen
    feedback = decode(events_pb2.FeedbackEvent, value)
    if not (feedback.feedback_id and feedback.response_id):
        raise ValueError("feedback event without feedback_id or response_id")
    return feedback


class CuratorWorker:
    """The join loop; `step()` runs one cycle (tests drive it), `run()` loops until stopped."""

    def __init__(self, settings: CuratorSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.limits = JoinLimits(
            settings.max_pending_per_partition,
            settings.max_pending_age_s,
            settings.max_pairs_per_answer,
        )
        self.metrics = CuratorMetrics(registry or CollectorRegistry())
        self.store = JoinStore(settings.state_dir)
        self.stored_offsets: dict[tuple[str, int], int] = self.store.offsets()
        self.producer = make_producer(settings.kafka)
        self.dead_letters = DeadLetters(
            settings.kafka, "curator", self.metrics.registry, producer=self.producer
        )
        self.consumer = make_consumer(
            settings.kafka,
            settings.group_id,
            max_poll_records=settings.max_poll_records,
            partition_assignment_strategy=[RangePartitionAssignor],
        )
        self.consumer.subscribe(
            [topics.GENERATIONS, topics.FEEDBACK], listener=SeekToStoredOffsets(self)
        )
        self.stopping = threading.Event()
        self._last_prune = 0.0

    def step(self) -> list[events_pb2.PreferenceRecord]:
        """One poll-join-produce-commit cycle; returns the preference records it produced."""
        batches = self.consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
        now = time.time()
        counts = JoinCounts()
        out: list[events_pb2.PreferenceRecord] = []
        next_offsets: dict[TopicPartition, int] = {}
        # 1-2. generations first, then feedback, each in offset order
        ordered = sorted(batches.items(), key=lambda kv: kv[0].topic != topics.GENERATIONS)
        with durable_cycle(self, batches, next_offsets):  # 4-5. on success; rewinds on failure
            for tp, records in ordered:
                self.metrics.consumed.labels(tp.topic).inc(len(records))
                for record in records:
                    next_offsets[tp] = record.offset + 1
                    try:
                        message = read_record(tp.topic, record.value)
                    except (DecodeError, ValueError) as err:
                        self.dead_letters.send_record(record, err)  # acked before the commit
                        continue
                    if tp.topic == topics.GENERATIONS:
                        out += on_generation(
                            self.store, tp.partition, message, now, self.limits, counts
                        )
                    else:
                        out += on_feedback(
                            self.store, tp.partition, message, now, self.limits, counts
                        )
            expire_waiting(self.store, now, self.limits, counts)
            if now - self._last_prune > 3600:
                self.store.prune(now - self.settings.retention_s)
                self._last_prune = now
            # 3. every output acknowledged before the state that produced it is committed
            futures = [
                self.producer.send(topics.PREFERENCES, key=prompt_hash(r.prompt), value=r)
                for r in out
            ]
            for future in futures:
                future.get(timeout=self.settings.kafka.delivery_timeout_ms / 1000)
        self._count(out, counts)
        return out

    def _count(self, out: list[events_pb2.PreferenceRecord], counts: JoinCounts) -> None:
        for record in out:
            self.metrics.emitted.labels(record.WhichOneof("kind")).inc()
        self.metrics.duplicates.inc(counts.duplicates)
        self.metrics.expired.inc(counts.expired)
        self.metrics.pending.set(self.store.pending_count())

    def run(self) -> None:
        run_cycles(self, "curator")

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=10)
        self.dead_letters.close()
        self.store.close()


def main() -> None:
    serve("curator", CuratorSettings(), CuratorWorker)
