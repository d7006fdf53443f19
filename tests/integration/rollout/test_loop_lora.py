"""The online loop with LoRA, on the real broker and Triton: rollout worker -> Kafka -> a LoRA
trainer -> a push of the adapter alone -> the policy merges it into its base and serves version
2, whose weights are the trainer's merged weights; the rollouts' reference log-probs come from
the reference service (the frozen base) as without LoRA."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import torch
from safetensors.torch import load_file

from services.common.lora_adapter import ADAPTER_FILE, read_config
from services.genproto.rlhf.v1 import policy_pb2
from services.policy.lora import KEPT_ADAPTER_DIR, MERGED_FILE
from services.policy.weights import folder_weight_files
from services.trainer.loop import TrainerService
from services.trainer.settings import TrainerSettings
from tests.integration.rollout.test_loop_end_to_end import (
    _generate_versions,
    _read_rollouts,
    _stub,
    _worker,
)
from tests.integration.trainer.helpers import private_topic
from tests.support.policy_stack import policy_stack
from tests.support.scoring_stacks import reference_stack, reward_stack


@pytest.fixture(scope="module")
def stacks(triton_server, kafka_settings, tiny_lm_dir, tiny_rm_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("loop-lora")
    name = f"loop-lora-{uuid.uuid4().hex[:8]}"  # its own name: other tests' announcements differ
    with (
        policy_stack(
            triton_server, kafka_settings, tiny_lm_dir, work / "policy", model_name=name
        ) as policy,
        reward_stack(triton_server, tiny_rm_dir) as reward,
        reference_stack(triton_server, tiny_lm_dir) as reference,
    ):
        yield policy, reward, reference


def test_a_lora_trainer_pushes_its_adapter_and_the_policy_serves_the_merge(
    stacks, kafka_settings, tiny_lm_dir, tmp_path
):
    policy, _, _ = stacks
    stub = _stub(policy.address)
    assert policy.weights_version == 1
    topic = private_topic(kafka_settings)
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Say hi.", "Count to three."]))

    # 1. The worker: 2 prompts x 4 samples = 8 rollouts.
    worker = _worker(
        stacks, kafka_settings, dataset, topic,
        samples_per_prompt=4, prompts_per_call=2, max_new_tokens=6, max_rollouts=8,
    )  # fmt: skip
    try:
        assert worker.run() == 8
    finally:
        worker.close()
    assert all(r.weights_version == 1 for r in _read_rollouts(kafka_settings, topic, 8))

    # 2. The trainer with LoRA: one update, then version 2 (the adapter) pushed.
    settings = TrainerSettings(
        model_dir=tiny_lm_dir, algorithm="grpo", batch_size=8, max_steps=1, rollouts_topic=topic,
        consumer_group=f"trainer-{topic}", policy_addresses=[policy.address],
        model_name=policy.model_name, state_dir=tmp_path / "trainer", kafka=kafka_settings,
        threads=1, learner={"lr": 5e-2}, lora_rank=4, lora_alpha=8.0,
    )  # fmt: skip
    trainer = TrainerService(settings)
    runner = threading.Thread(target=trainer.run)
    runner.start()
    runner.join(timeout=180)
    assert not runner.is_alive(), "the trainer did not finish its update"
    trainer.close()
    assert trainer.step == 1 and trainer.version == 2

    # 3. Only the adapter was written and pushed.
    pushed = settings.weights_dir / "v00000002"
    assert sorted(p.name for p in pushed.glob("*.safetensors")) == [ADAPTER_FILE]
    assert read_config(pushed / ADAPTER_FILE).base_version == 1
    publish = [
        json.loads(line)
        for line in settings.metrics_log.read_text().splitlines()
        if '"publish"' in line
    ]
    (replica,) = publish[-1]["replicas"]
    assert replica["address"] == policy.address and replica["accepted"], replica["reason"]

    # 4. The policy serves version 2: base + the trainer's adapter, merged at the swap.
    assert stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=30).weights_version == 2
    served_dir = policy.settings.weights_root / "v00000002"
    assert (served_dir / KEPT_ADAPTER_DIR / ADAPTER_FILE).is_file()
    served = {k: v for f in folder_weight_files(served_dir) for k, v in load_file(f).items()}
    assert (served_dir / MERGED_FILE).is_file()
    mine = trainer.learner.policy_state_dict()
    base = load_file(tiny_lm_dir / "model.safetensors")
    assert set(served) == set(mine) == set(base)
    moved = 0
    for name, tensor in mine.items():
        assert torch.allclose(served[name], tensor, atol=1e-6), name
        moved += not torch.equal(served[name], base[name])
    assert moved > 0, "the update left every weight where it was"
    assert set(_generate_versions(stub)) == {2}
