"""kill -9 the trainer mid-run, restart it, and count: every rollout produced is used in
exactly one update, none is lost, and Kafka's committed offsets reach the end of the topic."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

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


def _updates(log_path):
    return (
        [r for r in read_log(log_path) if r.get("event") == "update"] if log_path.exists() else []
    )


def _wait(predicate, timeout_s: float, daemon=None, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {what}; trainer log:\n{daemon.tail_log() if daemon else ''}"
    )


def test_kill_9_then_every_rollout_used_exactly_once(kafka_settings, tiny_lm_dir, tmp_path):
    topic = private_topic(kafka_settings)
    state = tmp_path / "trainer"
    groups = [synthetic_group(f"g{i:02d}", GROUP_SIZE) for i in range(16)]  # 64 rollouts
    produced = {r.rollout_id for g in groups for r in g}
    env = trainer_env(kafka_settings, tiny_lm_dir, state, topic, RLHF_TRAINER_IDLE_EXIT_S="4")
    log_path = state / "metrics.jsonl"

    # Run 1: killed once it has logged 3 updates (so during the 4th update or a checkpoint).
    produce_groups(kafka_settings, topic, groups)
    daemon = start_trainer(state, env)
    _wait(lambda: len(_updates(log_path)) >= 3, 90, daemon, "three updates")
    daemon.kill()
    killed_after = len(_updates(log_path))
    assert killed_after < 8, "the trainer finished before it could be killed"

    # Run 2: resumes from its last checkpoint, drains the topic and exits when idle.
    daemon = start_trainer(state, env)
    _wait(lambda: daemon.pid is None, 90, daemon, "the trainer to drain the topic and exit")
    records = read_log(log_path)
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 2 and resumes[1]["step"] >= 2  # update 3 follows checkpoint 2
    updates = effective_updates(records)
    used = [rid for u in updates for rid in u["rollout_ids"]]
    assert len(used) == len(set(used)), "a rollout was used twice"
    assert set(used) == produced, f"lost: {sorted(produced - set(used))}"
    assert [u["step"] for u in updates] == list(range(1, 9))
    # Each batch holds whole groups.
    for u in updates:
        groups_in = {rid.rsplit("-", 1)[0] for rid in u["rollout_ids"]}
        assert len(u["rollout_ids"]) == GROUP_SIZE * len(groups_in)

    final = checkpoint.latest(state / "checkpoints")
    assert final.step == 8 and final.weights_version == 9
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers, group_id=f"trainer-{topic}")
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        ends = consumer.end_offsets(tps)
        assert {tp.partition: consumer.committed(tp) or 0 for tp in tps} == {
            tp.partition: ends[tp] for tp in tps
        }
        assert final.positions[0].offsets == {tp.partition: ends[tp] for tp in tps if ends[tp]}
    finally:
        consumer.close()
