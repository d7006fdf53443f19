"""rlhf_kafka_consumer_lag: end offset - committed offset per group, topic and partition, recorded
at each commit and refreshed by the worker loop, exported on the registries services serve."""

from __future__ import annotations

import threading

from kafka import TopicPartition
from prometheus_client import CollectorRegistry, generate_latest

from services.common.consumer_lag import METRIC, ConsumerLag
from services.common.kafka import commit
from services.common.metrics import add_consumer_lag
from services.common.worker import run_cycles

TOPIC = "rlhf.rollouts.v1"
P0, P1, P2 = (TopicPartition(TOPIC, p) for p in range(3))


class FakeConsumer:
    """A KafkaConsumer's offset API over fixed end offsets, with a real commit table."""

    def __init__(self, group: str | None, ends: dict, assigned=(P0, P1), starts=None):
        self.config = {"group_id": group}
        self.ends = dict(ends)
        self.starts = starts or {tp: 0 for tp in ends}
        self.assigned = set(assigned)
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.broker_calls = 0
        self.fail = False

    def commit(self, offsets) -> None:
        self.committed_offsets.update({tp: meta.offset for tp, meta in offsets.items()})

    def end_offsets(self, partitions):
        self.broker_calls += 1
        if self.fail:
            raise TimeoutError("broker did not answer")
        return {tp: self.ends[tp] for tp in partitions}

    def beginning_offsets(self, partitions):
        return {tp: self.starts[tp] for tp in partitions}

    def committed(self, tp):
        return self.committed_offsets.get(tp)

    def assignment(self):
        return set(self.assigned)


def test_observe_is_end_offset_minus_committed_offset():
    lag = ConsumerLag()
    consumer = FakeConsumer("trainer", {P0: 100, P1: 7})
    lag.observe(consumer, {P0: 60, P1: 7})
    assert lag.value("trainer", TOPIC, 0) == 40
    assert lag.value("trainer", TOPIC, 1) == 0


def test_commit_records_the_lag_of_what_it_committed(monkeypatch):
    from services.common import consumer_lag

    table = ConsumerLag()
    monkeypatch.setattr("services.common.kafka.LAG", table)
    assert consumer_lag.LAG is not table
    consumer = FakeConsumer("curator", {P0: 12, P1: 30})
    commit(consumer, {P0: 10, P1: 30})
    assert consumer.committed_offsets == {P0: 10, P1: 30}
    assert (table.value("curator", TOPIC, 0), table.value("curator", TOPIC, 1)) == (2, 0)


def test_a_broker_that_does_not_answer_never_fails_the_commit():
    lag = ConsumerLag()
    consumer = FakeConsumer("curator", {P0: 12})
    consumer.fail = True
    lag.observe(consumer, {P0: 10})  # logged, not raised
    assert lag.value("curator", TOPIC, 0) is None


def test_consumers_outside_a_group_and_stand_ins_are_ignored():
    lag = ConsumerLag()
    follower = FakeConsumer(None, {P0: 5})
    lag.observe(follower, {P0: 1})
    lag.refresh(follower)
    lag.refresh(None)
    lag.refresh(object())
    assert follower.broker_calls == 0
    assert next(iter(lag.collect())).samples == []


def test_refresh_counts_uncommitted_partitions_from_their_first_offset_and_is_rate_limited():
    now = [0.0]
    lag = ConsumerLag(clock=lambda: now[0])
    consumer = FakeConsumer("refresh", {P0: 50, P1: 9}, starts={P0: 0, P1: 4})
    consumer.committed_offsets = {P0: 20}
    lag.refresh(consumer)
    assert (lag.value("refresh", TOPIC, 0), lag.value("refresh", TOPIC, 1)) == (30, 5)
    consumer.ends[P0] = 80  # records keep arriving while nothing is committed
    lag.refresh(consumer)
    assert lag.value("refresh", TOPIC, 0) == 30 and consumer.broker_calls == 1
    now[0] = 20.0
    lag.refresh(consumer)
    assert lag.value("refresh", TOPIC, 0) == 60 and consumer.broker_calls == 2


def test_a_revoked_partition_leaves_the_table():
    lag = ConsumerLag()
    consumer = FakeConsumer("trainer", {P0: 10, P1: 10, P2: 10}, assigned=(P0, P1))
    consumer.committed_offsets = {P0: 5, P1: 5}
    lag.observe(consumer, consumer.committed_offsets)
    consumer.assigned = {P1, P2}  # a rebalance: P0 went to another member
    lag.refresh(consumer, force=True)
    assert lag.value("trainer", TOPIC, 0) is None
    assert lag.value("trainer", TOPIC, 1) == 5 and lag.value("trainer", TOPIC, 2) == 10


def test_the_served_registry_exports_the_gauge_with_its_labels(monkeypatch):
    table = ConsumerLag()
    monkeypatch.setattr("services.common.metrics.LAG", table)
    registry = add_consumer_lag(CollectorRegistry())
    add_consumer_lag(registry)  # idempotent: a second call does not register twice
    table.observe(FakeConsumer("curator", {P0: 9}, assigned=(P0,)), {P0: 2})
    text = generate_latest(registry).decode()
    assert f"# TYPE {METRIC} gauge" in text
    assert f'{METRIC}{{group="curator",partition="0",topic="{TOPIC}"}} 7.0' in text


def test_the_worker_loop_refreshes_the_lag_even_when_its_cycles_fail(monkeypatch):
    table = ConsumerLag()
    monkeypatch.setattr("services.common.worker.LAG", table)
    consumer = FakeConsumer("curator", {P0: 40}, assigned=(P0,))

    class FailingWorker:
        def __init__(self):
            self.stopping = threading.Event()
            self.consumer = consumer
            self.cycles = 0

        def step(self):
            self.cycles += 1
            if self.cycles == 2:
                self.stopping.set()
            raise RuntimeError("poison")

    run_cycles(FailingWorker(), "curator", pause_s=0)
    assert table.value("curator", TOPIC, 0) == 40  # nothing committed: all of it is lag
