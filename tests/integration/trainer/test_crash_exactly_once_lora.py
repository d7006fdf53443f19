"""The kill -9 test of test_crash_exactly_once.py with LoRA on: the restarted trainer resumes its
adapters from the checkpoint, every rollout is used exactly once, the checkpoints hold only the
adapters, and every version folder it wrote for a push is the adapter alone."""

from __future__ import annotations

import torch

from services.common.lora_adapter import ADAPTER_FILE, read_config
from services.trainer import checkpoint
from services.trainer.metrics import effective_updates, read_log
from tests.integration.trainer.helpers import (
    private_topic,
    produce_groups,
    start_trainer,
    synthetic_group,
    trainer_env,
)
from tests.integration.trainer.test_crash_exactly_once import _updates, _wait

GROUP_SIZE = 4


def test_kill_9_with_lora_then_every_rollout_used_exactly_once(
    kafka_settings, tiny_lm_dir, tmp_path
):
    topic = private_topic(kafka_settings)
    state = tmp_path / "trainer"
    groups = [synthetic_group(f"g{i:02d}", GROUP_SIZE) for i in range(16)]  # 64 rollouts
    produced = {r.rollout_id for g in groups for r in g}
    env = trainer_env(
        kafka_settings,
        tiny_lm_dir,
        state,
        topic,
        RLHF_TRAINER_IDLE_EXIT_S="4",
        RLHF_TRAINER_LORA_RANK="4",
        RLHF_TRAINER_LORA_ALPHA="8",
        RLHF_TRAINER_LORA_TARGET_MODULES="q_proj,v_proj",
        RLHF_TRAINER_LEARNER='{"lr": 1e-2}',
    )
    log_path = state / "metrics.jsonl"

    produce_groups(kafka_settings, topic, groups)
    daemon = start_trainer(state, env)
    _wait(lambda: len(_updates(log_path)) >= 3, 90, daemon, "three updates")
    daemon.kill()
    assert len(_updates(log_path)) < 8, "the trainer finished before it could be killed"
    resumed_from = checkpoint.latest(state / "checkpoints")

    daemon = start_trainer(state, env)
    _wait(lambda: daemon.pid is None, 90, daemon, "the trainer to drain the topic and exit")
    records = read_log(log_path)
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 2 and resumes[1]["step"] == resumed_from.step >= 2
    updates = effective_updates(records)
    used = [rid for u in updates for rid in u["rollout_ids"]]
    assert len(used) == len(set(used)), "a rollout was used twice"
    assert set(used) == produced, f"lost: {sorted(produced - set(used))}"
    assert [u["step"] for u in updates] == list(range(1, 9))

    final = checkpoint.latest(state / "checkpoints")
    assert final.step == 8 and final.weights_version == 9
    names = set(final.tensors)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:3]
    assert len(names) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    # The resumed run trained on from the adapters it was killed with, not from scratch.
    moved = [
        not torch.equal(final.tensors[n], resumed_from.tensors[n]) for n in names if ".lora_B." in n
    ]
    assert any(moved)
    assert any(torch.count_nonzero(resumed_from.tensors[n]) for n in names if ".lora_B." in n)

    folders = sorted((state / "weights").glob("v*"))
    assert folders
    for folder in folders:
        assert sorted(p.name for p in folder.glob("*.safetensors")) == [ADAPTER_FILE]
        assert read_config(folder / ADAPTER_FILE).base_version == 1
