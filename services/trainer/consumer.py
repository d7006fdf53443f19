"""From Kafka records to training batches: whole groups, no duplicates, nothing too stale.

`RolloutBatcher` is pure bookkeeping (no Kafka): it buffers rollouts by group id until a group
is complete, de-duplicates by rollout id, drops rollouts more than `max_staleness` versions
behind the trainer (counted), and knows, per partition, the first offset whose record is not yet
fully handled: that offset and the ids handled beyond it are what a checkpoint stores, so a
restarted trainer re-reads exactly what it had not yet used.

`RolloutSource` reads the partitions of this rank (manual assignment: partition p goes to rank
p % world) starting at the offsets of the checkpoint, and commits offsets for monitoring.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from kafka import TopicPartition

from services.common.kafka import commit, decode, make_consumer
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import events_pb2
from services.trainer.checkpoint import ConsumerPosition

log = logging.getLogger(__name__)


@dataclass
class Received:
    """One record as read: where it came from and what it holds."""

    partition: int
    offset: int
    rollout: events_pb2.Rollout


@dataclass
class Unreadable:
    """A record that does not decode as a Rollout: it goes to the DLQ as it was."""

    partition: int
    offset: int
    record: Any
    """The kafka-python ConsumerRecord."""
    error: Exception


@dataclass
class Group:
    """The samples of one prompt, as they arrive."""

    group_id: str
    size: int
    members: list[Received] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.members) >= self.size


class RolloutBatcher:
    """Buffers, de-duplicates, drops stale rollouts and hands out batches of whole groups."""

    def __init__(self, batch_size: int, max_staleness: int, dedupe_window: int = 65536):
        self.batch_size = batch_size
        self.max_staleness = max_staleness
        self.groups: OrderedDict[str, Group] = OrderedDict()  # arrival order of first member
        self.next_offset: dict[int, int] = {}  # partition -> one past the last record read
        self.handled: dict[int, dict[int, str]] = {}  # partition -> offset -> id, used or dropped
        self.pending_ids: set[str] = set()
        self.recent: deque[str] = deque(maxlen=dedupe_window)
        self.recent_set: set[str] = set()
        self.skip: set[str] = set()  # from a checkpoint: ids handled before the crash
        self.counts: Counter[str] = Counter()  # consumed, duplicate, stale, invalid

    # -- restoring ----------------------------------------------------------------------------
    def restore(self, position: ConsumerPosition) -> None:
        self.skip = set(position.skip_ids)
        for rollout_id in position.recent_ids:
            self._remember(rollout_id)
        for partition, offset in position.offsets.items():
            self.next_offset[partition] = offset

    # -- intake -------------------------------------------------------------------------------
    def add(self, item: Received) -> str:
        """Takes one record; returns what became of it: pending, duplicate."""
        self.next_offset[item.partition] = max(
            self.next_offset.get(item.partition, 0), item.offset + 1
        )
        rollout_id = item.rollout.rollout_id
        if (
            rollout_id in self.skip
            or rollout_id in self.recent_set
            or rollout_id in self.pending_ids
        ):
            self.counts["duplicate"] += 1
            self._handled(item, rollout_id)
            return "duplicate"
        group_id = item.rollout.group_id or rollout_id
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = Group(group_id, max(1, item.rollout.group_size))
        group.members.append(item)
        self.pending_ids.add(rollout_id)
        return "pending"

    def add_invalid(self, partition: int, offset: int) -> None:
        """A record that is not a Rollout: counted, handled, never retried."""
        self.next_offset[partition] = max(self.next_offset.get(partition, 0), offset + 1)
        self.handled.setdefault(partition, {})[offset] = ""
        self.counts["invalid"] += 1

    # -- batches ------------------------------------------------------------------------------
    def drop_stale(self, trainer_version: int) -> list[Received]:
        """Removes pending rollouts more than max_staleness versions behind; returns them."""
        dropped: list[Received] = []
        for group_id in list(self.groups):
            group = self.groups[group_id]
            keep = []
            for item in group.members:
                if trainer_version - item.rollout.weights_version > self.max_staleness:
                    dropped.append(item)
                else:
                    keep.append(item)
            if len(keep) != len(group.members):
                # A group with a stale member can never be whole again: drop it all.
                dropped.extend(keep)
                del self.groups[group_id]
        for item in dropped:
            self.pending_ids.discard(item.rollout.rollout_id)
            self._handled(item, item.rollout.rollout_id)
        self.counts["stale"] += len(dropped)
        return dropped

    def peek(self) -> list[Group] | None:
        """Whole groups, oldest first, making a batch of at least batch_size rollouts; or None."""
        chosen: list[Group] = []
        total = 0
        for group in self.groups.values():
            if not group.complete:
                continue
            chosen.append(group)
            total += len(group.members)
            if total >= self.batch_size:
                return chosen
        return None

    def take(self, groups: list[Group]) -> list[Received]:
        """Removes `groups` from the buffer and marks their rollouts used."""
        used: list[Received] = []
        for group in groups:
            del self.groups[group.group_id]
            for item in group.members:
                self.pending_ids.discard(item.rollout.rollout_id)
                self._handled(item, item.rollout.rollout_id)
                used.append(item)
        self.counts["consumed"] += len(used)
        return used

    # -- checkpoint ---------------------------------------------------------------------------
    def position(self) -> ConsumerPosition:
        """Per partition the first offset still pending (or the next to read), plus the ids
        already handled at or after it; handled records below it are forgotten."""
        first_pending: dict[int, int] = {}
        for group in self.groups.values():
            for item in group.members:
                p = item.partition
                first_pending[p] = min(first_pending.get(p, item.offset), item.offset)
        offsets = {p: first_pending.get(p, nxt) for p, nxt in self.next_offset.items()}
        skip: list[str] = []
        for partition, by_offset in self.handled.items():
            resume = offsets.get(partition, 0)
            for offset in [o for o in by_offset if o < resume]:
                del by_offset[offset]
            skip.extend(i for i in by_offset.values() if i)
        return ConsumerPosition(
            offsets=offsets, skip_ids=sorted(set(skip)), recent_ids=list(self.recent)
        )

    def _handled(self, item: Received, rollout_id: str) -> None:
        self.handled.setdefault(item.partition, {})[item.offset] = rollout_id
        self._remember(rollout_id)

    def _remember(self, rollout_id: str) -> None:
        if rollout_id in self.recent_set:
            return
        if len(self.recent) == self.recent.maxlen:
            self.recent_set.discard(self.recent[0])
        self.recent.append(rollout_id)
        self.recent_set.add(rollout_id)


def partitions_of_rank(partitions: list[int], rank: int, world: int) -> list[int]:
    """The share of one rank: partition p belongs to rank p % world."""
    return [p for p in sorted(partitions) if p % world == rank]


class RolloutSource:
    """This rank's partitions of the rollouts topic, read from checkpointed offsets."""

    def __init__(
        self, settings: KafkaSettings, topic: str, group_id: str, rank: int = 0, world: int = 1
    ):
        self.topic = topic
        self.consumer = make_consumer(settings, group_id)
        partitions = self.consumer.partitions_for_topic(topic)
        if not partitions:
            raise RuntimeError(f"topic {topic!r} does not exist on {settings.bootstrap_servers}")
        self.all_partitions = sorted(partitions)
        self.partitions = partitions_of_rank(self.all_partitions, rank, world)
        self.consumer.assign([TopicPartition(topic, p) for p in self.partitions])

    def seek(self, offsets: dict[int, int]) -> dict[int, int]:
        """Checkpoint offsets first; without one, the group's committed offset, else the start."""
        start: dict[int, int] = {}
        for p in self.partitions:
            tp = TopicPartition(self.topic, p)
            if p in offsets:
                start[p] = offsets[p]
            else:
                committed = self.consumer.committed(tp)
                start[p] = (
                    committed
                    if committed is not None
                    else self.consumer.beginning_offsets([tp])[tp]
                )
            self.consumer.seek(tp, start[p])
        return start

    def poll(self, timeout_ms: int = 200, max_records: int = 500) -> list[Received | Unreadable]:
        """Decoded records, or `Unreadable` for records that are not Rollouts."""
        out: list[Received | Unreadable] = []
        for tp, records in self.consumer.poll(
            timeout_ms=timeout_ms, max_records=max_records
        ).items():
            for record in records:
                try:
                    rollout = decode(events_pb2.Rollout, record.value)
                except DecodeError as err:
                    out.append(Unreadable(tp.partition, record.offset, record, err))
                    continue
                out.append(Received(tp.partition, record.offset, rollout))
        return out

    def commit(self, offsets: dict[int, int]) -> None:
        """Commits (for lag monitoring) offsets already made durable by a checkpoint."""
        commit(self.consumer, {TopicPartition(self.topic, p): o for p, o in offsets.items()})

    def close(self) -> None:
        self.consumer.close()
