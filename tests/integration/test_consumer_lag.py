"""rlhf_kafka_consumer_lag on the real broker: after a commit, and after records arrive that
nothing committed, the gauge a service serves equals the end offset minus the group's committed
offset, both read back from the broker by clients of their own."""

from __future__ import annotations

import urllib.request
import uuid

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic
from prometheus_client import CollectorRegistry

from services.common.consumer_lag import LAG, METRIC
from services.common.kafka import commit, make_consumer, make_producer
from services.common.metrics import serve_metrics


def _broker_lag(settings, group: str, partitions: list[TopicPartition]) -> dict[int, int]:
    """What Kafka's own tools would print: end offset - committed offset, from fresh clients."""
    admin = KafkaAdminClient(bootstrap_servers=settings.servers)
    outsider = make_consumer(settings, group_id=None)
    try:
        committed = admin.list_group_offsets({group: partitions})[group]
        ends = outsider.end_offsets(partitions)
    finally:
        admin.close()
        outsider.close()
    return {tp.partition: ends[tp] - committed[tp].offset for tp in partitions}


def _scraped(port: int, group: str, topic: str) -> dict[int, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(f'{METRIC}{{group="{group}"') and f'topic="{topic}"' in line:
            partition = int(line.split('partition="')[1].split('"')[0])
            found[partition] = float(line.rsplit(" ", 1)[1])
    return found


def test_the_gauge_is_end_offset_minus_committed_offset(kafka_settings):
    topic = f"test.lag.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_settings.servers)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = make_producer(kafka_settings)

    def produce(partition: int, count: int) -> None:
        for i in range(count):
            producer.send(topic, key=f"k{i}", value=b"x", partition=partition).get(timeout=30)

    produce(0, 10)
    produce(1, 4)

    group = f"test-lag-{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(kafka_settings, group)
    consumer.assign([p0, p1])
    consumer.seek_to_beginning()
    seen: dict[TopicPartition, list[int]] = {p0: [], p1: []}
    for _ in range(60):
        for tp, records in consumer.poll(timeout_ms=500).items():
            seen[tp] += [r.offset for r in records]
        if len(seen[p0]) == 10 and len(seen[p1]) == 4:
            break
    assert (len(seen[p0]), len(seen[p1])) == (10, 4)

    server, thread = serve_metrics(CollectorRegistry(), 0, addr="127.0.0.1")
    try:
        # 1. A commit: six of partition 0's ten records are done, all four of partition 1's.
        commit(consumer, {p0: 6, p1: 4})
        assert _broker_lag(kafka_settings, group, [p0, p1]) == {0: 4, 1: 0}
        assert (LAG.value(group, topic, 0), LAG.value(group, topic, 1)) == (4, 0)
        assert _scraped(server.server_port, group, topic) == {0: 4.0, 1: 0.0}

        # 2. Five more records arrive and nothing is committed: the refresh sees them.
        produce(0, 5)
        LAG.refresh(consumer, force=True)
        assert _broker_lag(kafka_settings, group, [p0, p1]) == {0: 9, 1: 0}
        assert _scraped(server.server_port, group, topic) == {0: 9.0, 1: 0.0}
    finally:
        server.shutdown()
        thread.join(timeout=5)
        producer.close()
        consumer.close(autocommit=False)
