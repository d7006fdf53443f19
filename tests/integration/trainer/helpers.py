"""Shared pieces of the trainer-service integration tests: a private rollouts topic, synthetic
rollouts with known ids (whole groups, one partition per group), and the trainer subprocess."""

from __future__ import annotations

import os
import sys
import uuid
import zlib
from pathlib import Path

from kafka.admin import NewTopic

from deploy.local.process import Daemon
from services.common.kafka import connect_admin, make_producer
from services.genproto.rlhf.v1 import events_pb2

REPO = Path(__file__).resolve().parents[3]


def private_topic(kafka_settings, partitions: int = 4) -> str:
    name = f"test.rollouts.{uuid.uuid4().hex[:8]}"
    admin = connect_admin(kafka_settings)
    try:
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    return name


def synthetic_group(
    group_id: str, size: int, version: int = 1, vocab: int = 1000
) -> list[events_pb2.Rollout]:
    seed = zlib.crc32(group_id.encode())
    prompt = [(seed + k) % vocab + 1 for k in range(4)]
    return [
        events_pb2.Rollout(
            rollout_id=f"{group_id}-{i}",
            group_id=group_id,
            group_size=size,
            prompt_token_ids=prompt,
            response_token_ids=[(seed + 7 * i + k) % vocab + 1 for k in range(3)],
            behaviour_logprobs=[-1.5, -2.0, -0.5],
            reference_logprobs=[-1.4, -2.1, -0.6],
            reward=float(i) / size,
            weights_version=version,
        )
        for i in range(size)
    ]


def produce_groups(
    kafka_settings, topic: str, groups: list[list[events_pb2.Rollout]], partitions: int = 4
) -> None:
    """Every member of a group goes to the group's partition (keyed by rollout id, as in prod)."""
    producer = make_producer(kafka_settings)
    try:
        futures = [
            producer.send(
                topic,
                key=r.rollout_id,
                value=r,
                partition=zlib.crc32(r.group_id.encode()) % partitions,
            )
            for group in groups
            for r in group
        ]
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()


def trainer_env(
    kafka_settings, model_dir: Path, state_dir: Path, topic: str, **extra: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        RLHF_KAFKA_BOOTSTRAP_SERVERS=kafka_settings.bootstrap_servers,
        RLHF_TRAINER_MODEL_DIR=str(model_dir), RLHF_TRAINER_STATE_DIR=str(state_dir),
        RLHF_TRAINER_ROLLOUTS_TOPIC=topic, RLHF_TRAINER_WEIGHTS_TOPIC="",
        RLHF_TRAINER_CONSUMER_GROUP=f"trainer-{topic}", RLHF_TRAINER_ALGORITHM="grpo",
        RLHF_TRAINER_BATCH_SIZE="8", RLHF_TRAINER_THREADS="1", RLHF_TRAINER_MAX_STALENESS="100",
        RLHF_TRAINER_LEARNER='{"lr": 1e-4}',
    )  # fmt: skip
    env.update(extra)
    return env


def start_trainer(state_dir: Path, env: dict[str, str], name: str = "trainer") -> Daemon:
    daemon = Daemon(name, state_dir)
    daemon.start([sys.executable, "-m", "services.trainer"], env=env, cwd=REPO)
    return daemon
