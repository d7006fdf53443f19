"""Trainer faults: `kill -9` at random moments while rollouts flow, and a checkpoint folder that
fills up mid-run (a file-size limit set on the running process with prlimit(2), which binds root
too, where chmod would not).

Both count from the trainer's own metrics log (`effective_updates`: a resume voids the updates
its checkpoint did not keep) against the ids Kafka acknowledged, and read the group's committed
offsets back from the broker.
"""

from __future__ import annotations

import random
import resource
import time
import zlib

from kafka import KafkaConsumer, TopicPartition

from bench.chaos_scenarios import ChaosEnv, Row, wait_for
from bench.workers import Workers
from services.common.kafka import make_producer
from services.trainer import checkpoint
from services.trainer.metrics import effective_updates, read_log
from tests.integration.trainer.helpers import (
    private_topic,
    produce_groups,
    start_trainer,
    synthetic_group,
    trainer_env,
)

GROUP_SIZE = 4
PARTITIONS = 4
NEVER_STALE = {"RLHF_TRAINER_MAX_STALENESS": "1000000"}
"""Synthetic rollouts all claim weights version 1; after 100 updates the trainer would rightly drop
them as stale (counted, `rollouts/dropped_stale`). The suite counts use, so none goes stale."""


def updates_logged(log_path) -> int:
    if not log_path.exists():
        return 0
    return sum(1 for r in read_log(log_path) if r.get("event") == "update")


def count_used(row: Row, produced: set[str], log_path) -> list[dict]:
    """Every produced rollout must be in exactly one effective update."""
    updates = effective_updates(read_log(log_path))
    row.count(produced, [rid for u in updates for rid in u["rollout_ids"]])
    row.check(
        [u["step"] for u in updates] == list(range(1, len(updates) + 1)),
        "effective updates are steps 1..n with no gap",
    )
    return updates


def committed_offsets(kafka, topic: str, group: str) -> tuple[dict[int, int], dict[int, int]]:
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, group_id=group)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = consumer.end_offsets(tps)
        return (
            {tp.partition: consumer.committed(tp) or 0 for tp in tps},
            {tp.partition: ends[tp] for tp in tps},
        )
    finally:
        consumer.close()


class GroupProducer(Workers):
    """Produces whole groups of synthetic rollouts at a steady pace until stopped; `acked` holds
    the ids Kafka acknowledged."""

    def __init__(self, kafka, topic: str, prefix: str, every_s: float):
        self.producer = make_producer(kafka)
        self.topic, self.prefix, self.every_s = topic, prefix, every_s
        self.acked: set[str] = set()
        self.failed = 0
        super().__init__()

    def work(self, _n: int) -> None:
        n = 0
        while not self.stopping.is_set():
            # Two groups at a time: a whole batch (8), so none is left waiting for a partner.
            groups = [synthetic_group(f"{self.prefix}{n:04d}-{k}", GROUP_SIZE) for k in (0, 1)]
            futures = [
                (
                    r.rollout_id,
                    self.producer.send(
                        self.topic,
                        key=r.rollout_id,
                        value=r,
                        partition=zlib.crc32(r.group_id.encode()) % PARTITIONS,
                    ),
                )
                for group in groups
                for r in group
            ]
            for rid, future in futures:
                try:
                    future.get(timeout=30)
                    self.acked.add(rid)
                except Exception:  # noqa: BLE001 - not acknowledged: counted, never lost
                    self.failed += 1
            n += 1
            self.stopping.wait(self.every_s)

    def close(self) -> None:
        # Bounded: a record Kafka never acknowledged must not hold the scenario forever.
        self.producer.close(timeout=30)


def trainer_kill(env: ChaosEnv, kills: int = 10, seed: int = 0) -> Row:
    """kill -9 the trainer `kills` times, each at a random moment after it made progress, while
    rollouts flow; a last start drains the topic. Every rollout in exactly one update."""
    row = Row("trainer kill -9")
    rng = random.Random(seed)
    topic = private_topic(env.kafka, PARTITIONS)
    state = env.folder("trainer-kill")
    trainer = trainer_env(
        env.kafka, env.lm_dir, state, topic, RLHF_TRAINER_IDLE_EXIT_S="5", **NEVER_STALE
    )
    log_path = state / "metrics.jsonl"
    with GroupProducer(env.kafka, topic, "kill-g", every_s=1.5) as producer:
        for _ in range(kills):
            before = updates_logged(log_path)
            daemon = start_trainer(state, trainer)
            if not row.check(
                wait_for(lambda before=before: updates_logged(log_path) > before, 120),
                "the trainer makes progress after a restart",
            ):
                daemon.kill()
                break
            time.sleep(rng.uniform(0.0, 2.0))  # mid-update, mid-checkpoint or between them
            daemon.kill()
            row.injected += 1
        producer.stop()
        row.requests_failed += producer.failed
    daemon = start_trainer(state, trainer)
    row.check(wait_for(lambda: daemon.pid is None, 240), "the last start drains the topic")
    daemon.kill()
    resumes = [r for r in read_log(log_path) if r.get("event") == "resume"]
    row.check(len(resumes) == row.injected + 1, "every start resumed from the log's checkpoint")
    count_used(row, producer.acked, log_path)
    committed, ends = committed_offsets(env.kafka, topic, f"trainer-{topic}")
    row.check(committed == ends, "the committed offsets reach the end of the topic")
    row.notes.append(f"{len(resumes)} starts, {len(effective_updates(read_log(log_path)))} updates")
    return row


def checkpoint_full(env: ChaosEnv, groups: int = 12) -> Row:
    """The checkpoint folder fills (RLIMIT_FSIZE below the checkpoint's size) after two updates:
    the trainer stops with the OS's error, Kafka holds no offset beyond the last checkpoint, and
    a start with room again uses every rollout exactly once."""
    row = Row("checkpoint folder full")
    topic = private_topic(env.kafka, PARTITIONS)
    state = env.folder("checkpoint-full")
    batches = [synthetic_group(f"full-g{i:03d}", GROUP_SIZE) for i in range(groups)]
    produce_groups(env.kafka, topic, batches, PARTITIONS)
    produced = {r.rollout_id for g in batches for r in g}
    trainer = trainer_env(
        env.kafka, env.lm_dir, state, topic, RLHF_TRAINER_IDLE_EXIT_S="4", **NEVER_STALE
    )
    log_path = state / "metrics.jsonl"
    daemon = start_trainer(state, trainer)
    if not row.check(wait_for(lambda: updates_logged(log_path) >= 2, 120), "two updates"):
        daemon.kill()
        return row
    pid = daemon.pid
    biggest = max(p.stat().st_size for p in (state / "checkpoints").rglob("*") if p.is_file())
    limit = biggest // 2  # room for the log lines, not for another checkpoint
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
    row.injected += 1
    stopped = wait_for(lambda: daemon.pid is None, 120)
    row.check(stopped, "the trainer stops when its checkpoint cannot be written")
    if not stopped:
        daemon.kill()
    code = daemon._popen.wait(timeout=10)
    row.check(code != 0, f"the trainer exits non-zero (got {code})")
    error = "File too large"
    row.check(error in daemon.log_file.read_text(), f"the trainer's log names the error ({error})")
    saved = checkpoint.latest(state / "checkpoints")
    committed, _ = committed_offsets(env.kafka, topic, f"trainer-{topic}")
    durable = {p: o for pos in saved.positions.values() for p, o in pos.offsets.items()}
    row.check(
        all(committed[p] <= durable.get(p, 0) for p in committed),
        f"no committed offset beyond the last checkpoint (committed {committed}, "
        f"checkpoint {durable})",
    )
    row.notes.append(f"stopped after {updates_logged(log_path)} updates, checkpoint {saved.step}")
    # With room again, a restart resumes from the checkpoint: nothing lost, nothing twice.
    daemon = start_trainer(state, trainer)
    row.check(wait_for(lambda: daemon.pid is None, 180), "the restart drains the topic")
    daemon.kill()
    count_used(row, produced, log_path)
    return row
