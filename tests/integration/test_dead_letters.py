"""A poison record stalls no consumer: on the real broker, the curator, the refresh and the trainer
each send a record they cannot use to `<topic>.dlq` (with where it came from and why), count it,
and go on to the next record, which they use."""

from __future__ import annotations

import time
import uuid

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from services.common import topics
from services.common.kafka import ensure_topics, make_producer
from services.common.preferences import Source, pair_record, prompt_hash
from services.genproto.rlhf.v1 import common_pb2, events_pb2
from services.trainer.metrics import read_log
from tests.integration.curator.curator_steps import make_worker, step_until
from tests.integration.trainer.helpers import (
    private_topic,
    produce_groups,
    start_trainer,
    synthetic_group,
    trainer_env,
)

POISON = b"\xff\xfe this is not protobuf"


def dead_letters(kafka_settings, topic: str, want: int, timeout_s: float = 60.0) -> list:
    """The records of `<topic>.dlq` (at least `want` of them, or what there is at the timeout)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers)
    found: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.partitions_for_topic(topics.dlq_topic(topic)):
            assert time.monotonic() < deadline, f"{topics.dlq_topic(topic)} was never created"
            time.sleep(0.5)
        tp = TopicPartition(topics.dlq_topic(topic), 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        while len(found) < want and time.monotonic() < deadline:
            found += consumer.poll(timeout_ms=500).get(tp, [])
    finally:
        consumer.close()
    return found


def headers_of(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def test_the_curator_dead_letters_a_poison_record_and_joins_the_next(kafka_settings, tmp_path):
    rid = f"dlq-{uuid.uuid4().hex[:8]}"
    producer = make_producer(kafka_settings)
    poison = producer.send(topics.FEEDBACK, key=rid, value=POISON).get(30)
    generation = events_pb2.GenerationRecord(
        response_id=rid, prompt=common_pb2.Prompt(text=f"q {rid}"), response_text="a"
    )
    producer.send(topics.GENERATIONS, key=rid, value=generation).get(30)
    feedback = events_pb2.FeedbackEvent(
        feedback_id=f"f-{rid}", response_id=rid, thumb=events_pb2.THUMB_UP
    )
    producer.send(topics.FEEDBACK, key=rid, value=feedback).get(30)
    producer.close()

    worker = make_worker(kafka_settings, tmp_path / "curator")
    try:
        out = step_until(
            worker, lambda out: any(r.label.completion == "a" and rid in r.prompt for r in out)
        )
        assert [r.WhichOneof("kind") for r in out if rid in r.prompt] == ["label"]
        counted = worker.metrics.registry.get_sample_value(
            "rlhf_dlq_records_total", {"topic": topics.FEEDBACK, "consumer": "curator"}
        )
    finally:
        worker.close()
    assert counted >= 1
    mine = [
        r
        for r in dead_letters(kafka_settings, topics.FEEDBACK, 1)
        if headers_of(r)["dlq.source.offset"] == str(poison.offset)
        and headers_of(r)["dlq.source.partition"] == str(poison.partition)
    ]
    assert len(mine) == 1
    assert mine[0].value == POISON and mine[0].key == rid.encode()
    h = headers_of(mine[0])
    assert h["dlq.source.topic"] == topics.FEEDBACK and h["dlq.consumer"] == "curator"
    assert h["dlq.error"].startswith("DecodeError")


def test_the_refresh_dead_letters_unusable_records(kafka_settings, tmp_path, tiny_rm_dir):
    from services.refresh.settings import RefreshSettings
    from services.refresh.worker import RefreshWorker

    topic = f"test.preferences.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_settings, [topics.TopicSpec(topic, 1)])
    good = pair_record("q", "good", "bad", Source.PREFERENCE_SOURCE_FILE, [], "pair-good")
    same = pair_record("q", "same", "same", Source.PREFERENCE_SOURCE_FILE, [], "pair-same")
    producer = make_producer(kafka_settings)
    for value in (POISON, same, good):
        producer.send(topic, key=prompt_hash("q"), value=value).get(30)
    producer.close()
    settings = RefreshSettings(
        kafka=kafka_settings,
        topic=topic,
        group_id=f"refresh-{topic}",
        state_dir=tmp_path / "state",
        base_model_dir=tiny_rm_dir,
        versions_root=tmp_path / "versions",
        reward_address="",
        metrics_port=0,
        poll_timeout_ms=300,
        refresh_every=1000,
    )
    registry = CollectorRegistry()
    worker = RefreshWorker(settings, registry)
    try:
        deadline = time.monotonic() + 60
        while worker.store.count(held_out=False) + worker.store.count(held_out=True) < 1:
            assert time.monotonic() < deadline, "the good pair after the poison was never stored"
            worker.step()
    finally:
        worker.close()
    letters = dead_letters(kafka_settings, topic, 2)
    assert [headers_of(r)["dlq.source.offset"] for r in letters] == ["0", "1"]
    assert "undecodable" in headers_of(letters[0])["dlq.error"]
    assert "chosen == rejected" in headers_of(letters[1])["dlq.error"]
    assert (
        registry.get_sample_value("rlhf_dlq_records_total", {"topic": topic, "consumer": "refresh"})
        == 2
    )


def test_the_trainer_dead_letters_and_keeps_training(kafka_settings, tiny_lm_dir, tmp_path):
    topic = private_topic(kafka_settings, partitions=1)
    broken = synthetic_group("broken", 1)[0]
    del broken.behaviour_logprobs[:]  # decodes, but a log-prob per token is missing
    producer = make_producer(kafka_settings)
    producer.send(topic, key="poison", value=POISON, partition=0).get(30)
    producer.send(topic, key=broken.rollout_id, value=broken, partition=0).get(30)
    producer.close()
    produce_groups(kafka_settings, topic, [synthetic_group(f"g{i}", 4) for i in range(2)], 1)

    state = tmp_path / "trainer"
    env = trainer_env(kafka_settings, tiny_lm_dir, state, topic, RLHF_TRAINER_IDLE_EXIT_S="4")
    daemon = start_trainer(state, env)
    try:
        deadline = time.monotonic() + 180
        while daemon.pid is not None:
            assert time.monotonic() < deadline, daemon.tail_log()
            time.sleep(0.5)
    finally:
        daemon.stop(timeout_s=30)
    updates = [r for r in read_log(state / "metrics.jsonl") if r.get("event") == "update"]
    assert len(updates) == 1, daemon.tail_log()  # the 8 good rollouts after the two bad ones
    letters = dead_letters(kafka_settings, topic, 2)
    assert [headers_of(r)["dlq.source.offset"] for r in letters] == ["0", "1"]
    assert letters[0].value == POISON
    assert events_pb2.Rollout.FromString(letters[1].value) == broken
    assert headers_of(letters[1])["dlq.error"].startswith("invalid rollout")
    assert headers_of(letters[1])["message-type"] == "rlhf.v1.Rollout"


def test_the_policy_weights_follower_dead_letters_and_follows_on(kafka_settings):
    from types import SimpleNamespace

    from services.policy.follower import WeightsFollower
    from services.policy.metrics import PolicyMetrics

    producer = make_producer(kafka_settings)
    poison = producer.send(topics.WEIGHTS, key="no-such-model", value=POISON).get(30)
    producer.close()
    registry = CollectorRegistry()
    updater = SimpleNamespace(version=10**9)  # every announcement is old news: nothing installs
    follower = WeightsFollower(kafka_settings, {"policy"}, updater, PolicyMetrics(registry))
    follower.start()
    try:
        labels = {"topic": topics.WEIGHTS, "consumer": "policy-weights-follower"}
        deadline = time.monotonic() + 60
        while not registry.get_sample_value("rlhf_dlq_records_total", labels):
            assert time.monotonic() < deadline, "the poison weights record was not dead-lettered"
            time.sleep(0.2)
        assert follower._thread.is_alive()  # it follows on
    finally:
        follower.stop()
    mine = [
        r
        for r in dead_letters(kafka_settings, topics.WEIGHTS, 1)
        if headers_of(r)["dlq.source.offset"] == str(poison.offset)
        and headers_of(r)["dlq.consumer"] == "policy-weights-follower"
    ]
    assert mine and mine[0].value == POISON
