"""kill -9 the trainer mid-run, restart it, and count: every rollout produced is used in
exactly one update, none is lost, and Kafka's committed offsets reach the end of the topic."""

from __future__ import annotations

import json
import shutil
import time

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

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

    # One number, one set of weights: versions pushed past the checkpoint before the kill (their
    # steps redone) are numbered past, never pushed again with other bytes.
    final = checkpoint.latest(state / "checkpoints")
    resumed = resumes[1]
    assert final.step == 8
    assert final.weights_version == resumed["weights_version"] + 8 - resumed["step"]
    _assert_one_set_of_weights_per_version(records)
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


def _assert_one_set_of_weights_per_version(records) -> None:
    digests: dict[int, set] = {}
    for r in records:
        if r.get("event") == "publish":
            digests.setdefault(r["weights_version"], set()).add(json.dumps(r["files/blake3"]))
    assert digests and all(len(d) == 1 for d in digests.values()), digests


def test_a_restart_behind_pushed_versions_numbers_past_them(kafka_settings, tiny_lm_dir, tmp_path):
    """Pushed before durable: the newest checkpoint lost (as a crash between a push and its
    checkpoint leaves it), the restart serves that checkpoint's weights under a new number,
    and the version folders already written keep their bytes."""
    topic = private_topic(kafka_settings)
    state = tmp_path / "trainer"
    groups = [synthetic_group(f"r{i:02d}", GROUP_SIZE) for i in range(8)]  # 4 updates of 8
    env = trainer_env(
        kafka_settings,
        tiny_lm_dir,
        state,
        topic,
        RLHF_TRAINER_IDLE_EXIT_S="3",
        RLHF_TRAINER_PUSH_IN_BACKGROUND="false",  # every version pushed (none replaced)
    )
    produce_groups(kafka_settings, topic, groups)
    daemon = start_trainer(state, env)
    _wait(lambda: daemon.pid is None, 120, daemon, "the first run to drain the topic")
    weights = state / "weights"
    pushed = {p.name: (p / "model.safetensors").read_bytes() for p in weights.glob("v*")}
    assert sorted(pushed) == ["v00000003", "v00000004", "v00000005"]  # the 3 newest kept
    newest = checkpoint.complete_checkpoints(state / "checkpoints")[0]
    shutil.rmtree(newest)  # step 4's checkpoint (version 5) never reached the disk
    behind = checkpoint.latest(state / "checkpoints")
    assert (behind.step, behind.weights_version) == (3, 4)

    daemon = start_trainer(state, env)
    _wait(lambda: daemon.pid is None, 120, daemon, "the restart to redo step 4 and exit")
    records = read_log(state / "metrics.jsonl")
    resumed = [r for r in records if r.get("event") == "resume"][-1]
    assert (resumed["step"], resumed["weights_version"], resumed["renumbered"]) == (3, 6, True)
    republished = [r for r in records if r.get("event") == "publish"][-2:]
    assert [(r["step"], r["weights_version"]) for r in republished] == [(3, 6), (4, 7)]
    # Version 6 is step 3's weights (version 4's bytes), under a number never used before.
    assert (weights / "v00000006" / "model.safetensors").read_bytes() == pushed["v00000004"]
    assert (weights / "v00000005" / "model.safetensors").read_bytes() == pushed["v00000005"]
    final = checkpoint.latest(state / "checkpoints")
    assert (final.step, final.weights_version) == (4, 7)
    _assert_one_set_of_weights_per_version(records)


def test_a_restart_commits_the_offsets_its_checkpoint_holds(kafka_settings, tiny_lm_dir, tmp_path):
    """A kill after a checkpoint is on disk but before its offsets reach Kafka: the restart
    commits them, even with nothing new to train (the group's offsets are set back to stand in
    for the commit the kill prevented)."""
    topic = private_topic(kafka_settings)
    state = tmp_path / "trainer"
    produce_groups(kafka_settings, topic, [synthetic_group(f"c{i}", GROUP_SIZE) for i in range(4)])
    env = trainer_env(kafka_settings, tiny_lm_dir, state, topic, RLHF_TRAINER_IDLE_EXIT_S="3")
    group = f"trainer-{topic}"
    daemon = start_trainer(state, env)
    _wait(lambda: daemon.pid is None, 120, daemon, "the first run to drain the topic")
    tps = [TopicPartition(topic, p) for p in range(4)]
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_settings.servers, group_id=group, enable_auto_commit=False
    )
    try:
        ends = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
        assert {consumer.committed(tp) for tp in tps} == {0}
    finally:
        consumer.close()

    daemon = start_trainer(state, env)
    _wait(lambda: daemon.pid is None, 120, daemon, "the restart to find nothing new and exit")
    assert len(_updates(state / "metrics.jsonl")) == 2  # 16 rollouts, batch 8: none twice
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers, group_id=group)
    try:
        assert {tp.partition: consumer.committed(tp) or 0 for tp in tps} == {
            tp.partition: ends[tp] for tp in tps
        }
    finally:
        consumer.close()
