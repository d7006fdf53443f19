"""A poison record (bytes that are no protobuf) on every consumed topic, followed by a good
record, with each topic's real consumer running: the curator (generations, feedback), the refresh
(preferences), the trainer (rollouts) and the policy's weights follower (weights). Each poison
must land in `<topic>.dlq` with its origin (counted by source partition and offset), and each
consumer must go on to use the good record behind it.
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from bench.chaos_scenarios import ChaosEnv, Row, wait_for
from bench.chaos_scenarios.trainer import NEVER_STALE, updates_logged
from services.common import topics
from services.common.kafka import ensure_topics, make_producer
from services.common.preferences import Source, pair_record, prompt_hash
from services.genproto.rlhf.v1 import common_pb2, events_pb2
from tests.integration.curator.curator_steps import make_worker, step_until
from tests.integration.trainer.helpers import (
    private_topic,
    produce_groups,
    start_trainer,
    synthetic_group,
    trainer_env,
)

POISON = b"\xff\xfe chaos: this is not protobuf"


def dead_lettered(kafka, topic: str, wanted: set[str], timeout_s: float = 60.0) -> list[str]:
    """`partition:offset` of every record in `<topic>.dlq` that came from `topic`, read until all
    of `wanted` are there or the timeout."""
    dlq = topics.dlq_topic(topic)
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, enable_auto_commit=False)
    found: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.partitions_for_topic(dlq) and time.monotonic() < deadline:
            time.sleep(0.5)
        parts = [TopicPartition(dlq, p) for p in consumer.partitions_for_topic(dlq) or ()]
        if not parts:
            return found
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        while not wanted <= set(found) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    h = {k: v.decode() for k, v in r.headers}
                    if h.get("dlq.source.topic") == topic:
                        found.append(f"{h['dlq.source.partition']}:{h['dlq.source.offset']}")
    finally:
        consumer.close()
    return found


class Poisoner:
    def __init__(self, kafka):
        self.producer = make_producer(kafka)
        self.sent: dict[str, set[str]] = {}

    def send(self, topic: str, key: str, count: int, partition: int | None = None) -> None:
        for _ in range(count):
            meta = self.producer.send(topic, key=key, value=POISON, partition=partition).get(30)
            self.sent.setdefault(topic, set()).add(f"{meta.partition}:{meta.offset}")

    def close(self) -> None:
        self.producer.close()


def poison_records(env: ChaosEnv, per_topic: int = 1) -> Row:
    row = Row("poison record on every consumed topic")
    run = uuid.uuid4().hex[:8]
    state = env.folder("poison")
    rollouts = private_topic(env.kafka, 1) if env.private_topics else topics.ROLLOUTS
    preferences = f"chaos.preferences.{run}" if env.private_topics else topics.PREFERENCES
    ensure_topics(env.kafka, [topics.TopicSpec(preferences, 1)])
    poisoner = Poisoner(env.kafka)
    try:
        # 1. The curator: poisons on generations and feedback, then a generation and its thumb.
        rid = f"chaos-{run}"
        poisoner.send(topics.GENERATIONS, rid, per_topic)
        poisoner.send(topics.FEEDBACK, rid, per_topic)
        generation = events_pb2.GenerationRecord(
            response_id=rid, prompt=common_pb2.Prompt(text=f"q {rid}"), response_text="a"
        )
        feedback = events_pb2.FeedbackEvent(
            feedback_id=f"f-{rid}", response_id=rid, thumb=events_pb2.THUMB_UP
        )
        poisoner.producer.send(topics.GENERATIONS, key=rid, value=generation).get(30)
        poisoner.producer.send(topics.FEEDBACK, key=rid, value=feedback).get(30)
        worker = make_worker(env.kafka, state / "curator")
        try:
            step_until(worker, lambda out: any(rid in r.prompt for r in out), timeout_s=120)
        except TimeoutError:
            row.check(False, "the curator joins the thumb behind the poisons")
        finally:
            worker.close()

        # 2. The trainer: poisons, then one whole batch.
        poisoner.send(rollouts, "poison", per_topic, partition=0)
        groups = [synthetic_group(f"poison-{run}-{i}", 4) for i in range(2)]
        produce_groups(env.kafka, rollouts, groups, partitions=1)
        trainer_state = state / "trainer"
        daemon = start_trainer(
            trainer_state,
            trainer_env(
                env.kafka,
                env.lm_dir,
                trainer_state,
                rollouts,
                RLHF_TRAINER_IDLE_EXIT_S="4",
                **NEVER_STALE,
            ),
        )

        # 3. The weights follower: poisons, then an announcement it must hand to its updater.
        from services.policy.follower import WeightsFollower
        from services.policy.metrics import PolicyMetrics

        model = f"chaos-{run}"
        poisoner.send(topics.WEIGHTS, model, per_topic)
        poisoner.producer.send(
            topics.WEIGHTS,
            key=model,
            value=events_pb2.WeightsVersionEvent(model=model, weights_version=2, location="/x"),
        ).get(30)
        installed: list[int] = []
        updater = SimpleNamespace(
            version=1, install_folder=lambda event: installed.append(event.weights_version) or 2
        )
        follower = WeightsFollower(env.kafka, {model}, updater, PolicyMetrics(CollectorRegistry()))
        follower.start()

        # 4. The refresh: poisons, then a usable pair (while the trainer and follower run).
        refresh_stored = refresh_after_poison(env, poisoner, preferences, state, per_topic)
        row.check(refresh_stored, "the refresh stores the pair behind the poisons")
        row.check(wait_for(lambda: installed == [2], 60), "the follower hands on the next version")
        follower.stop()
        row.check(wait_for(lambda: daemon.pid is None, 180), "the trainer drains its topic")
        daemon.kill()
        row.check(
            updates_logged(trainer_state / "metrics.jsonl") == 1,
            "the trainer trains on the batch behind the poisons",
        )
    finally:
        poisoner.close()
    for topic, sent in poisoner.sent.items():
        row.injected += len(sent)
        row.count(sent, dead_lettered(env.kafka, topic, sent))
    return row


def refresh_after_poison(env: ChaosEnv, poisoner: Poisoner, topic: str, state, count: int) -> bool:
    from services.refresh.settings import RefreshSettings
    from services.refresh.worker import RefreshWorker

    poisoner.send(topic, prompt_hash("q"), count)
    good = pair_record("q", "good", "bad", Source.PREFERENCE_SOURCE_FILE, [], f"pair-{topic}")
    poisoner.producer.send(topic, key=prompt_hash("q"), value=good).get(30)
    settings = RefreshSettings(
        kafka=env.kafka,
        topic=topic,
        group_id=f"refresh-chaos-{uuid.uuid4().hex[:8]}",
        state_dir=state / "refresh",
        base_model_dir=env.rm_dir,
        versions_root=state / "refresh-versions",
        reward_address="",
        metrics_port=0,
        poll_timeout_ms=300,
        refresh_every=1000,
    )
    worker = RefreshWorker(settings, CollectorRegistry())
    try:
        deadline = time.monotonic() + 90
        while worker.store.count(held_out=False) + worker.store.count(held_out=True) < 1:
            if time.monotonic() > deadline:
                return False
            worker.step()
        return True
    finally:
        worker.close()
