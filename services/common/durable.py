"""The durable Kafka cycle every stateful consumer here shares (the curator, the reward
refresh): a sqlite store holding the worker's state and the next offset of every partition it
consumed, committed before the offsets go to Kafka; on a rebalance the consumer seeks to the
store's offsets, so after a crash a batch is either replayed whole or was never processed.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from kafka import ConsumerRebalanceListener, TopicPartition

from services.common.kafka import commit

log = logging.getLogger(__name__)

OFFSETS_SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (
  topic TEXT, partition INTEGER, next_offset INTEGER, PRIMARY KEY (topic, partition));
"""


class DurableStore:
    """A sqlite file in WAL mode with synchronous commits and the consumed offsets of each
    partition: the state a Kafka worker commits before it commits its offsets to Kafka.
    Callers group writes with `commit`/`rollback`."""

    def __init__(self, state_dir: Path, file_name: str, schema: str):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(state_dir / file_name, isolation_level="DEFERRED")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
        self.db.executescript(OFFSETS_SCHEMA + schema)
        self.db.commit()

    def commit(self) -> None:
        self.db.commit()

    def rollback(self) -> None:
        self.db.rollback()

    def close(self) -> None:
        self.db.close()

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO offsets VALUES (?,?,?)", (topic, partition, next_offset)
        )

    def offsets(self) -> dict[tuple[str, int], int]:
        return {
            (t, p): o
            for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM offsets")
        }


class SeekToStoredOffsets(ConsumerRebalanceListener):
    """On assignment, seeks each partition to the offset the worker's durable store holds (the
    store, not Kafka's committed offsets, is the source of truth after a crash). The worker has
    a `consumer` and `stored_offsets`, the in-memory copy of its store's offsets."""

    def __init__(self, worker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        # Called on kafka-python's coordinator thread: it reads the in-memory copy, not sqlite.
        stored = dict(self.worker.stored_offsets)
        for tp in assigned:
            if (tp.topic, tp.partition) in stored:
                self.worker.consumer.seek(tp, stored[(tp.topic, tp.partition)])


@contextmanager
def durable_cycle(worker, batches: dict, next_offsets: dict[TopicPartition, int]):
    """Steps 4-5 of a cycle, around its processing (the `with` body), for a worker with a
    DurableStore `store`, a `consumer` and `stored_offsets` (the curator, the reward refresh).
    When the body succeeds, the offsets it put in `next_offsets` are stored and the store's
    transaction committed, then they are committed to Kafka (a failure there is only logged: the
    store's copy wins on restart). When the body fails, the transaction is rolled back and the
    consumer rewound to the batch's start, so the next cycle reads the batch again."""
    try:
        yield
        for tp, offset in next_offsets.items():
            worker.store.set_offset(tp.topic, tp.partition, offset)
        worker.store.commit()
        worker.stored_offsets = {
            **worker.stored_offsets,
            **{(tp.topic, tp.partition): o for tp, o in next_offsets.items()},
        }
    except Exception:
        worker.store.rollback()
        for tp, records in batches.items():
            worker.consumer.seek(tp, records[0].offset)
        raise
    try:
        commit(worker.consumer, next_offsets)
    except Exception as exc:  # noqa: BLE001 - a rebalance: the store's offsets are the truth
        log.warning("kafka offset commit failed", extra={"fields": {"error": repr(exc)}})
