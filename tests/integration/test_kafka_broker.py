"""The real Kafka broker: topics as designed, and a protobuf rollout through an idempotent
acks=all producer and a manually-committing consumer group."""

from __future__ import annotations

import uuid

from kafka import KafkaAdminClient, TopicPartition

from services.common import topics
from services.common.kafka import commit, decode, make_consumer, make_producer
from services.genproto.rlhf.v1 import events_pb2


def _rollout(i: int) -> events_pb2.Rollout:
    return events_pb2.Rollout(
        rollout_id=f"r-{i}-{uuid.uuid4().hex[:8]}",
        group_id="g-1",
        prompt_token_ids=[1, 2, 3],
        response_token_ids=[4, 5 + i],
        behaviour_logprobs=[-0.5, -1.25],
        reference_logprobs=[-0.75, -1.0],
        reward=0.5 * i,
        weights_version=7,
        group_size=4,
    )


def test_topics_exist_with_designed_partitions(kafka_settings):
    admin = KafkaAdminClient(bootstrap_servers=kafka_settings.servers)
    try:
        described = {
            t["name"]: len(t["partitions"])
            for t in admin.describe_topics([s.name for s in topics.TOPICS])
        }
    finally:
        admin.close()
    assert described == {s.name: s.partitions for s in topics.TOPICS}
    # The curator's join is partition-local only if both sides have the same partition count.
    assert described[topics.GENERATIONS] == described[topics.FEEDBACK]


def test_rollout_round_trip_with_manual_commit(kafka_settings):
    producer = make_producer(kafka_settings)
    assert producer.config["acks"] == -1 and producer.config["enable_idempotence"]
    sent = [_rollout(i) for i in range(5)]
    metadata = [
        producer.send(topics.ROLLOUTS, key=r.rollout_id, value=r).get(timeout=30) for r in sent
    ]
    producer.close()
    assert all(m.offset >= 0 for m in metadata)

    group = f"test-{uuid.uuid4().hex[:8]}"
    wanted = {r.rollout_id for r in sent}
    consumer = make_consumer(kafka_settings, group, [topics.ROLLOUTS])
    received: dict[str, events_pb2.Rollout] = {}
    next_offsets: dict[TopicPartition, int] = {}
    for _ in range(60):
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                rollout = decode(events_pb2.Rollout, record.value)
                assert record.key.decode() == rollout.rollout_id
                received[rollout.rollout_id] = rollout
                next_offsets[tp] = record.offset + 1
        if wanted <= received.keys():
            break
    assert wanted <= received.keys()
    for r in sent:
        got = received[r.rollout_id]
        assert got == r  # every field survived the wire
    commit(consumer, next_offsets)
    consumer.close()

    # The group's committed offsets are exactly where it stopped: a restart reads nothing twice.
    again = make_consumer(kafka_settings, group)
    for tp, offset in next_offsets.items():
        assert again.committed(tp) == offset
    again.assign(list(next_offsets))
    leftovers = [r for batch in again.poll(timeout_ms=2000).values() for r in batch]
    assert not {decode(events_pb2.Rollout, r.value).rollout_id for r in leftovers} & wanted
    again.close()


def test_uncommitted_records_are_redelivered(kafka_settings):
    """Without a commit, a consumer that dies gives its records to the next member of the group."""
    producer = make_producer(kafka_settings)
    rollout = _rollout(99)
    producer.send(topics.ROLLOUTS, key=rollout.rollout_id, value=rollout).get(timeout=30)
    producer.close()

    group = f"test-{uuid.uuid4().hex[:8]}"
    seen = 0
    for _attempt in range(2):
        consumer = make_consumer(kafka_settings, group, [topics.ROLLOUTS])
        found = False
        for _ in range(60):
            records = [r for batch in consumer.poll(timeout_ms=500).values() for r in batch]
            if any(
                decode(events_pb2.Rollout, r.value).rollout_id == rollout.rollout_id
                for r in records
            ):
                found = True
                break
        consumer.close(autocommit=False)
        seen += found
    assert seen == 2
