"""durable_cycle: the commit protocol the curator and the reward refresh share (steps 4-5)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from services.common.durable import DurableStore, durable_cycle

TOPIC = "rlhf.preferences.v1"
SCHEMA = "CREATE TABLE IF NOT EXISTS items (name TEXT);"


class RecordingConsumer:
    """Stands in for a KafkaConsumer: remembers seeks and commits; can fail its commit."""

    def __init__(self, fail_commit: bool = False):
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail_commit = fail_commit

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def commit(self, offsets) -> None:
        if self.fail_commit:
            raise RuntimeError("rebalance in progress")
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


def _worker(tmp_path: Path, consumer: RecordingConsumer) -> SimpleNamespace:
    return SimpleNamespace(
        store=DurableStore(tmp_path, "state.sqlite", SCHEMA), consumer=consumer, stored_offsets={}
    )


def _batch() -> dict[TopicPartition, list[SimpleNamespace]]:
    return {
        TopicPartition(TOPIC, 0): [SimpleNamespace(offset=10), SimpleNamespace(offset=11)],
        TopicPartition(TOPIC, 1): [SimpleNamespace(offset=3)],
    }


def _items(store: DurableStore) -> list[str]:
    return [name for (name,) in store.db.execute("SELECT name FROM items")]


def test_success_stores_offsets_with_the_work_then_commits_them_to_kafka(tmp_path: Path):
    worker = _worker(tmp_path, RecordingConsumer())
    next_offsets: dict[TopicPartition, int] = {}
    with durable_cycle(worker, _batch(), next_offsets):
        worker.store.db.execute("INSERT INTO items VALUES ('a')")
        next_offsets.update({TopicPartition(TOPIC, 0): 12, TopicPartition(TOPIC, 1): 4})

    reopened = DurableStore(tmp_path, "state.sqlite", SCHEMA)  # what survives a crash now
    assert _items(reopened) == ["a"]
    assert reopened.offsets() == {(TOPIC, 0): 12, (TOPIC, 1): 4}
    assert worker.stored_offsets == {(TOPIC, 0): 12, (TOPIC, 1): 4}
    assert worker.consumer.commits == [{TopicPartition(TOPIC, 0): 12, TopicPartition(TOPIC, 1): 4}]
    assert worker.consumer.seeks == []


def test_failure_rolls_back_and_rewinds_every_partition_to_the_batch_start(tmp_path: Path):
    worker = _worker(tmp_path, RecordingConsumer())
    worker.stored_offsets = {(TOPIC, 0): 10, (TOPIC, 1): 3}
    next_offsets: dict[TopicPartition, int] = {}
    with pytest.raises(TimeoutError), durable_cycle(worker, _batch(), next_offsets):
        worker.store.db.execute("INSERT INTO items VALUES ('a')")
        next_offsets[TopicPartition(TOPIC, 0)] = 12
        raise TimeoutError("preference records not acknowledged")

    assert _items(worker.store) == [] and worker.store.offsets() == {}
    assert worker.stored_offsets == {(TOPIC, 0): 10, (TOPIC, 1): 3}
    assert sorted(worker.consumer.seeks) == [
        (TopicPartition(TOPIC, 0), 10),
        (TopicPartition(TOPIC, 1), 3),
    ]
    assert worker.consumer.commits == []


def test_a_failed_kafka_commit_keeps_the_stored_cycle(tmp_path: Path):
    worker = _worker(tmp_path, RecordingConsumer(fail_commit=True))
    next_offsets = {TopicPartition(TOPIC, 0): 12}
    with durable_cycle(worker, _batch(), next_offsets):
        worker.store.db.execute("INSERT INTO items VALUES ('a')")

    assert _items(worker.store) == ["a"]
    assert worker.store.offsets() == {(TOPIC, 0): 12}
    assert worker.stored_offsets == {(TOPIC, 0): 12}
    assert worker.consumer.seeks == []
