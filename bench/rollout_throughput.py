"""Rollouts/s through Kafka against the same loop in one process, and the trainer's samples/s.

    python -m bench.rollout_throughput         # writes bench/results/rollout_throughput.json

The loop: a producer thread makes rollouts (realistic sizes: prompt and response token ids,
two log-prob lists, reward) and a trainer thread turns them into whole-group batches
(`RolloutBatcher`) and runs `Learner.step` on a tiny policy. The only difference between the two
runs is the transport between the threads:
  - in process: serialized protobuf bytes through a `queue.Queue`;
  - Kafka: the idempotent acks=all producer to a fresh 4-partition topic on the real broker,
    and the trainer's `RolloutSource` (manual assignment, decode) on the other side.
Headline `ratio_vs_in_process` = Kafka rollouts/s / in-process rollouts/s (goal >= 0.8). The
transport alone (no learner) is measured too, as `transport_*`, to show Kafka's raw cost.
The broker is the project's own (deploy/local/kafka.py), started for the run unless
RLHF_KAFKA_BOOTSTRAP_SERVERS names one.
"""

from __future__ import annotations

import json
import os
import queue
import random
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import torch

from bench.run import write_result
from services.common.kafka import connect_admin, make_producer
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import events_pb2
from services.trainer.consumer import Received, RolloutBatcher, RolloutSource
from services.trainer.learner import Learner, LearnerConfig, RolloutSample

PARTITIONS = 4
GROUP = 4
BATCH = 8
PROMPT_TOKENS, RESPONSE_TOKENS = 32, 48


def make_groups(count: int, vocab: int, seed: int = 0) -> list[list[events_pb2.Rollout]]:
    rng = random.Random(seed)
    groups = []
    for g in range(count):
        gid = f"{uuid.uuid4().hex}"
        prompt = [rng.randrange(1, vocab) for _ in range(PROMPT_TOKENS)]
        groups.append([
            events_pb2.Rollout(
                rollout_id=f"{gid}-{i}", group_id=gid, group_size=GROUP, weights_version=1, reward=rng.random(),
                prompt_token_ids=prompt, response_token_ids=[rng.randrange(1, vocab) for _ in range(RESPONSE_TOKENS)],
                behaviour_logprobs=[-rng.random() * 3 for _ in range(RESPONSE_TOKENS)],
                reference_logprobs=[-rng.random() * 3 for _ in range(RESPONSE_TOKENS)],
            )
            for i in range(GROUP)
        ])  # fmt: skip
    return groups


def to_sample(r: events_pb2.Rollout) -> RolloutSample:
    return RolloutSample(
        list(r.prompt_token_ids), list(r.response_token_ids), list(r.behaviour_logprobs),
        list(r.reference_logprobs), r.reward, r.group_id, r.weights_version, r.rollout_id,
    )  # fmt: skip


def train_loop(next_items, total: int, learner: Learner | None) -> tuple[float, float]:
    """Consumes `total` rollouts into batches (and updates); returns (seconds, seconds in step)."""
    batcher = RolloutBatcher(BATCH, max_staleness=100)
    used, in_step, started = 0, 0.0, None
    while used < total:
        items = next_items()
        if items and started is None:
            started = time.perf_counter()
        for item in items:
            batcher.add(item)
        while (groups := batcher.peek()) is not None:
            batch = batcher.take(groups)
            used += len(batch)
            if learner is not None:
                t = time.perf_counter()
                learner.step([to_sample(r.rollout) for r in batch])
                in_step += time.perf_counter() - t
    return time.perf_counter() - started, in_step


def run_in_process(groups, learner) -> tuple[float, float]:
    q: queue.Queue = queue.Queue(maxsize=1024)
    total = sum(len(g) for g in groups)

    def produce():
        offset = 0
        for group in groups:
            for r in group:
                q.put((zlib.crc32(r.group_id.encode()) % PARTITIONS, offset, r.SerializeToString()))
                offset += 1

    def next_items():
        out = []
        try:
            while True:
                p, o, data = q.get(timeout=0.05) if not out else q.get_nowait()
                out.append(Received(p, o, events_pb2.Rollout.FromString(data)))
        except queue.Empty:
            return out

    producer = threading.Thread(target=produce)
    producer.start()
    seconds, in_step = train_loop(next_items, total, learner)
    producer.join()
    return total / seconds, in_step


def run_kafka(settings: KafkaSettings, groups, learner) -> tuple[float, float]:
    from kafka.admin import NewTopic

    topic = f"bench.rollouts.{uuid.uuid4().hex[:8]}"
    admin = connect_admin(settings)
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()
    total = sum(len(g) for g in groups)
    source = RolloutSource(settings, topic, f"bench-{topic}")
    source.seek({})
    source.poll(timeout_ms=100)  # connections up before the clock starts

    def produce():
        producer = make_producer(settings)
        for group in groups:
            for r in group:
                producer.send(
                    topic,
                    key=r.rollout_id,
                    value=r,
                    partition=zlib.crc32(r.group_id.encode()) % PARTITIONS,
                )
        producer.flush()
        producer.close()

    producer = threading.Thread(target=produce)
    producer.start()
    seconds, in_step = train_loop(lambda: source.poll(timeout_ms=50), total, learner)
    producer.join()
    source.close()
    return total / seconds, in_step


def main() -> None:
    from tests.support.tiny_models import tiny_causal_lm

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    broker = None
    servers = os.environ.get("RLHF_KAFKA_BOOTSTRAP_SERVERS")
    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    if not servers:
        from deploy.local.kafka import KafkaBroker

        broker = KafkaBroker(state_dir=work / "kafka")
        broker.start()
        servers = broker.bootstrap_servers
    settings = KafkaSettings(bootstrap_servers=servers, client_id="bench")
    try:
        model_dir = tiny_causal_lm(work / "tiny-lm")
        learner = Learner(LearnerConfig(algorithm="grpo", lr=1e-5), model_dir)
        vocab = learner.policy.get_input_embeddings().num_embeddings
        learner.step([to_sample(r) for g in make_groups(2, vocab, seed=99) for r in g])  # warm-up

        transport_groups = make_groups(1000, vocab, seed=1)  # 4000 rollouts
        transport_in_process, _ = run_in_process(transport_groups, None)
        transport_kafka, _ = run_kafka(settings, transport_groups, None)

        loop_groups = make_groups(32, vocab, seed=2)  # 128 rollouts, 16 updates
        loop_in_process, step_s = run_in_process(loop_groups, learner)
        loop_kafka, _ = run_kafka(settings, loop_groups, learner)
        rollouts = sum(len(g) for g in loop_groups)
        result = {
            "ratio_vs_in_process": loop_kafka / loop_in_process,
            "rollouts_per_s_kafka": loop_kafka,
            "rollouts_per_s_in_process": loop_in_process,
            "trainer_samples_per_s": rollouts / step_s,
            "transport_rollouts_per_s_kafka": transport_kafka,
            "transport_rollouts_per_s_in_process": transport_in_process,
            "transport_ratio": transport_kafka / transport_in_process,
            "rollouts_in_loop": rollouts,
            "rollouts_in_transport": sum(len(g) for g in transport_groups),
            "batch_size": BATCH,
            "group_size": GROUP,
            "prompt_tokens": PROMPT_TOKENS,
            "response_tokens": RESPONSE_TOKENS,
            "policy": "tiny Llama (2 layers, hidden 64, SmolLM2 vocabulary), GRPO, CPU float32",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
    finally:
        if broker is not None:
            broker.stop()
    write_result("rollout_throughput", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
