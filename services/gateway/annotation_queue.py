"""The annotation queue behind GET /v1/annotation-queue: the answers the reward model is least
sure how to order (AnnotationCandidate on rlhf.annotation-queue.v1, published by the rollout
worker), offered to people highest `disagreement` first.

Every gateway replica tails two topics in a background thread, without a consumer group (each
replica holds the whole queue; nothing is committed):

  1. rlhf.annotation-queue.v1 from the beginning of its retention: each candidate joins the
     queue, unless it was answered already; the queue keeps the `capacity` candidates of highest
     disagreement and forgets the rest (bounded memory);
  2. rlhf.preferences.v1 from `lookback_s` ago (a candidate can only be answered after it was
     published, so what is older than the candidates' retention answers none of them): a record
     a person posted (source ANNOTATION) names the candidate it answers in `derived_from` after
     its event id (services/gateway/events.py); that id leaves the queue, on every replica, and
     is remembered (a bounded set) in case its candidate is read later.

A record that does not decode or is not a usable candidate goes to `<topic>.dlq`
(services/common/dead_letters.py) and the tail moves on. The replica that accepts a ranking
drops its candidate at once, without waiting for the topic.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from collections.abc import Iterable

from google.protobuf.message import DecodeError
from kafka import TopicPartition

from services.common import topics
from services.common.dead_letters import DeadLetters
from services.common.kafka import decode, make_consumer
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

ANNOTATION = events_pb2.PREFERENCE_SOURCE_ANNOTATION


def check_candidate(candidate: events_pb2.AnnotationCandidate) -> None:
    """ValueError (the record is dead-lettered) for a candidate no one could rank."""
    if not candidate.candidate_id:
        raise ValueError("annotation candidate without candidate_id")
    if len(candidate.responses) < 2:
        raise ValueError(f"candidate {candidate.candidate_id}: fewer than 2 responses")
    if candidate.response_ids and len(candidate.response_ids) != len(candidate.responses):
        raise ValueError(f"candidate {candidate.candidate_id}: response_ids do not match responses")
    if candidate.disagreement != candidate.disagreement:  # NaN never orders
        raise ValueError(f"candidate {candidate.candidate_id}: disagreement is NaN")


def answered_ids(record: events_pb2.PreferenceRecord) -> list[str]:
    """The candidate ids a preference record answers: what follows the event id in the
    `derived_from` of a record a person posted."""
    if record.source != ANNOTATION:
        return []
    return list(record.derived_from[1:])


class AnnotationQueue:
    """The top `capacity` unanswered candidates by disagreement, and the `answered_capacity`
    most recently answered ids; thread-safe (the tail writes, the routes read)."""

    def __init__(self, capacity: int, answered_capacity: int):
        self.capacity, self.answered_capacity = capacity, answered_capacity
        self._lock = threading.Lock()
        self._order: list[tuple[float, str]] = []  # (-disagreement, id), ascending
        self._candidates: dict[str, events_pb2.AnnotationCandidate] = {}
        self._answered: collections.OrderedDict[str, None] = collections.OrderedDict()

    def offer(self, candidate: events_pb2.AnnotationCandidate) -> bool:
        """Queues `candidate` (a newer copy of a queued id replaces it); False when it was
        answered already or ranks below the `capacity` kept."""
        cid = candidate.candidate_id
        with self._lock:
            if cid in self._answered:
                return False
            self._remove(cid)
            entry = (-candidate.disagreement, cid)
            bisect.insort(self._order, entry)
            self._candidates[cid] = candidate
            while len(self._order) > self.capacity:
                _, dropped = self._order.pop()
                del self._candidates[dropped]
            return cid in self._candidates

    def answer(self, candidate_ids: Iterable[str]) -> None:
        """Removes the candidates and remembers their ids (a later copy is not queued)."""
        with self._lock:
            for cid in candidate_ids:
                self._remove(cid)
                self._answered[cid] = None
                self._answered.move_to_end(cid)
            while len(self._answered) > self.answered_capacity:
                self._answered.popitem(last=False)

    def top(self, limit: int) -> list[events_pb2.AnnotationCandidate]:
        """The `limit` queued candidates of highest disagreement, highest first (ties: by id)."""
        with self._lock:
            return [self._candidates[cid] for _, cid in self._order[:limit]]

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def _remove(self, cid: str) -> None:
        old = self._candidates.pop(cid, None)
        if old is not None:
            self._order.pop(bisect.bisect_left(self._order, (-old.disagreement, cid)))


class QueueTail:
    """The background reader of both topics into an AnnotationQueue (steps 1-2 above)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        queue: AnnotationQueue,
        dead_letters: DeadLetters,
        lookback_s: float,
        poll_ms: int = 500,
    ):
        self.kafka, self.queue, self.dead_letters = kafka, queue, dead_letters
        self.lookback_s, self.poll_ms = lookback_s, poll_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="annotation-queue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tail()
            except Exception:  # a broker outage or a DLQ write that failed: start over
                log.exception("annotation queue tail failed; retrying")
                self._stop.wait(2.0)

    def _tail(self) -> None:
        consumer = make_consumer(self.kafka, None)
        try:
            parts = self._assign(consumer)
            while parts is not None and not self._stop.is_set():
                for records in consumer.poll(timeout_ms=self.poll_ms).values():
                    for record in records:
                        self.handle(record)
        finally:
            consumer.close()

    def _assign(self, consumer) -> list[TopicPartition] | None:
        """Assigns every partition of both topics (waiting for them to exist) and seeks: the
        candidates from their beginning, the preferences from `lookback_s` ago."""
        while not self._stop.is_set():
            queue = consumer.partitions_for_topic(topics.ANNOTATION_QUEUE)
            prefs = consumer.partitions_for_topic(topics.PREFERENCES)
            if queue and prefs:
                break
            self._stop.wait(1.0)
        else:
            return None
        queue_parts = [TopicPartition(topics.ANNOTATION_QUEUE, p) for p in sorted(queue)]
        pref_parts = [TopicPartition(topics.PREFERENCES, p) for p in sorted(prefs)]
        consumer.assign(queue_parts + pref_parts)
        consumer.seek_to_beginning(*queue_parts)
        since_ms = int((time.time() - self.lookback_s) * 1000)
        found = consumer.offsets_for_times({tp: since_ms for tp in pref_parts})
        end = consumer.end_offsets(pref_parts)
        for tp in pref_parts:
            at = found.get(tp)
            consumer.seek(tp, at.offset if at is not None else end[tp])
        return queue_parts + pref_parts

    def handle(self, record) -> None:
        """One consumed record: a candidate queued, answers noted, or a dead letter."""
        try:
            if record.topic == topics.ANNOTATION_QUEUE:
                candidate = decode(events_pb2.AnnotationCandidate, record.value)
                check_candidate(candidate)
                self.queue.offer(candidate)
            else:
                answered = answered_ids(decode(events_pb2.PreferenceRecord, record.value))
                if answered:
                    self.queue.answer(answered)
        except (DecodeError, ValueError) as error:
            self.dead_letters.send_record(record, error)
