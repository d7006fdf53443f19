"""Two trainer ranks (two processes, gloo) on the real broker: each reads its own partitions, the
gradients are averaged, and both hold identical weights after every step."""

from __future__ import annotations

import time
import zlib

from deploy.local.process import free_port
from services.trainer import checkpoint
from services.trainer.distributed import weights_digest
from services.trainer.metrics import read_log
from tests.integration.trainer.helpers import (
    private_topic,
    produce_groups,
    start_trainer,
    synthetic_group,
    trainer_env,
)

STEPS = 3


def _groups_on(partition: int, count: int) -> list:
    """`count` groups whose partition (crc32(group id) % 4) is `partition`."""
    out, i = [], 0
    while len(out) < count:
        gid = f"p{partition}-g{i}"
        if zlib.crc32(gid.encode()) % 4 == partition:
            out.append(synthetic_group(gid, 4))
        i += 1
    return out


def test_two_gloo_ranks_hold_identical_weights_after_every_step(
    kafka_settings, tiny_lm_dir, tmp_path
):
    topic = private_topic(kafka_settings)
    # Rank 0 owns partitions 0 and 2, rank 1 owns 1 and 3: 3 groups on each partition.
    groups = [g for p in range(4) for g in _groups_on(p, 3)]
    produce_groups(kafka_settings, topic, groups)
    state = tmp_path / "trainer"
    port = free_port()
    daemons = []
    for rank in (0, 1):
        env = trainer_env(
            kafka_settings, tiny_lm_dir, state, topic,
            RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            RLHF_TRAINER_MAX_STEPS=str(STEPS), RLHF_TRAINER_LOG_WEIGHTS_DIGEST="true",
        )  # fmt: skip
        daemons.append(start_trainer(state, env, name=f"trainer-rank-{rank}"))
    deadline = time.monotonic() + 120
    while any(d.pid is not None for d in daemons) and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = "\n".join(d.tail_log() for d in daemons)
    for d in daemons:
        d.kill()
    rank_logs = [state / "metrics.jsonl", state / "metrics-rank-1.jsonl"]
    updates = [[r for r in read_log(p) if r.get("event") == "update"] for p in rank_logs]
    assert [len(u) for u in updates] == [STEPS, STEPS], logs

    digests = [[u["weights/sha256"] for u in rank] for rank in updates]
    assert digests[0] == digests[1]  # identical weights on both ranks after each step
    assert len(set(digests[0])) == STEPS  # and they did change every step

    # Each rank trained on its own partitions' rollouts, never the other's.
    ids = [{rid for u in rank for rid in u["rollout_ids"]} for rank in updates]
    assert not ids[0] & ids[1]
    owner = {r.rollout_id: zlib.crc32(r.group_id.encode()) % 4 % 2 for g in groups for r in g}
    assert all(owner[rid] == 0 for rid in ids[0]) and all(owner[rid] == 1 for rid in ids[1])
    assert len(ids[0]) == len(ids[1]) == STEPS * 8

    # Rank 0's checkpoint holds those same weights and both ranks' positions.
    final = checkpoint.latest(state / "checkpoints")
    assert final.step == STEPS and set(final.positions) == {0, 1}
    policy = {
        k.removeprefix("policy."): v for k, v in final.tensors.items() if k.startswith("policy.")
    }
    from services.trainer.learner import Learner, LearnerConfig

    learner = Learner(LearnerConfig(algorithm="grpo"), tiny_lm_dir)
    learner.policy.load_state_dict(policy)
    assert weights_digest(learner.policy_state_dict()) == digests[0][-1]
    assert set(final.positions[0].offsets) == {0, 2} and set(final.positions[1].offsets) == {1, 3}
