"""LoRA end to end on the real service: a trainer's LoRA learner writes its adapter version
(services/trainer/weights_push.write_adapter_version), the trainer's push sends only the adapter,
the policy merges it into its base at the swap, and Triton then generates what the learner's
merged weights generate. A second adapter is merged into the base (not on top of the first), a
full push of the base unmerges, and an adapter for another base is refused while the old version
keeps serving."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from services.common.lora_adapter import ADAPTER_FILE
from services.genproto.rlhf.v1 import policy_pb2
from services.trainer.learner import Learner, LearnerConfig
from services.trainer.weights_push import build_manifest, push_all, write_adapter_version
from tests.integration.policy.test_weights import greedy, in_process_greedy
from tests.support.push import push_folder


def _learner(tiny_lm_dir, seed: int) -> Learner:
    """A LoRA learner whose adapters moved (as training would move them), from `seed`."""
    config = LearnerConfig(
        algorithm="grpo",
        lora_rank=4,
        lora_alpha=8.0,
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        seed=seed,
    )
    learner = Learner(config, tiny_lm_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in learner.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return learner


def _merged_folder(learner: Learner, tiny_lm_dir, folder):
    """The learner's merged weights as a model folder, for in-process generation."""
    shutil.copytree(tiny_lm_dir, folder)
    save_file(learner.policy_state_dict(), folder / "model.safetensors")
    return folder


def _push(policy, folder, version):
    (result,) = push_all([policy.address], folder, build_manifest(folder, version))
    return result


@pytest.fixture(scope="module")
def base_again(channel, policy, tiny_lm_dir):
    """Leaves the session's service serving the base weights again (as a newer version)."""
    yield
    response = push_folder(channel, tiny_lm_dir, policy.weights_version + 1)
    assert response.accepted, response.reason


def test_a_lora_push_sends_the_adapter_and_serves_the_merged_model(
    stub, channel, policy, tiny_lm_dir, tmp_path, base_again
):
    base_tokens = in_process_greedy(tiny_lm_dir)
    for round_, seed in enumerate((11, 12)):
        learner = _learner(tiny_lm_dir, seed)
        version = policy.weights_version + 1
        folder = write_adapter_version(
            tmp_path / "trainer", version, *learner.adapter_push(base_version=1)
        )
        result = _push(policy, folder, version)
        assert result.accepted, result.reason
        assert result.bytes_sent == (folder / ADAPTER_FILE).stat().st_size
        assert result.bytes_sent * 20 < (tiny_lm_dir / "model.safetensors").stat().st_size
        assert stub.GetModelInfo(policy_pb2.GetModelInfoRequest()).weights_version == version
        sample = greedy(stub)
        assert sample.weights_version == version
        expected = in_process_greedy(_merged_folder(learner, tiny_lm_dir, tmp_path / f"m{round_}"))
        assert list(sample.token_ids) == expected
        assert expected != base_tokens  # the adapter changed what the model says
        assert policy.service.servicer.updater.last_merge_s > 0

    # Unmerge: the base pushed as a full version serves the base's own tokens again.
    response = push_folder(channel, tiny_lm_dir, policy.weights_version + 1)
    assert response.accepted, response.reason
    assert list(greedy(stub).token_ids) == base_tokens


def test_an_adapter_for_another_base_is_refused_and_the_old_version_serves(
    stub, policy, tiny_lm_dir, tmp_path
):
    learner = _learner(tiny_lm_dir, 13)
    before = policy.weights_version
    tokens = list(greedy(stub).token_ids)
    folder = write_adapter_version(
        tmp_path, before + 1, *learner.adapter_push(base_version=before + 50)
    )
    result = _push(policy, folder, before + 1)
    assert not result.accepted and "LoRA adapter not merged" in result.reason
    assert policy.weights_version == before
    sample = greedy(stub)
    assert sample.weights_version == before and list(sample.token_ids) == tokens
