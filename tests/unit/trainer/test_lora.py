"""LoRA in the trainer: only the adapters train (the base, hence the reference, stays frozen),
a checkpoint holds just them and resumes to the identical next step, a LoRA checkpoint is refused
by a learner that disagrees on LoRA, the pushed folder is the adapter alone (peft opens it), and
the weights the policy will merge from it equal the learner's own.

    pytest tests/unit/trainer/test_lora.py -q
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from services.common.lora_adapter import ADAPTER_FILE, PEFT_CONFIG_FILE, read_config
from services.common.models import load_causal_lm
from services.policy import lora as policy_lora
from services.trainer import checkpoint, lora
from services.trainer.checkpoint import Checkpoint
from services.trainer.learner import Learner, LearnerConfig
from services.trainer.settings import TrainerSettings
from services.trainer.weights_push import build_manifest, write_adapter_version
from tests.unit.trainer.rl_loop import random_prompts, rollouts

LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_target_modules": ("q_proj", "v_proj")}


def _config(**overrides) -> LearnerConfig:
    return LearnerConfig(**{"algorithm": "grpo", "lr": 1e-2, "seed": 3, **LORA, **overrides})


def _batches(policy_dir, steps: int):
    learner = Learner(LearnerConfig(algorithm="grpo"), policy_dir)
    reference = load_causal_lm(policy_dir, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(5)
    return [
        rollouts(learner, reference, random_prompts(generator, 4), seed=s) for s in range(steps)
    ]


def _adapter_params(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.adapter_state_dict().items()}


def test_only_the_adapters_train_and_the_base_stays_the_reference(small_vocab_policy_dir):
    (batch,) = _batches(small_vocab_policy_dir, 1)
    learner = Learner(_config(), small_vocab_policy_dir)
    names = [n for n, p in learner.policy.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {id(p) for p in learner._parameters()} == {
        id(p) for p in learner.policy.parameters() if p.requires_grad
    }
    base = load_causal_lm(small_vocab_policy_dir, torch.device("cpu"), torch.float32)
    before = _adapter_params(learner)
    learner.step(batch)
    after = _adapter_params(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with learner.policy.disable_adapter():  # the frozen base: what the reference serves
            assert torch.equal(learner.policy(ids).logits, base(ids).logits)
        assert not torch.allclose(learner.policy(ids).logits, base(ids).logits)
    # The merged weights are exactly what the adapted model computes with.
    merged = learner.policy_state_dict()
    assert all(".lora_" not in k and "base_layer" not in k for k in merged)
    base.load_state_dict(merged, strict=False)
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, learner.policy(ids).logits, atol=1e-5)


def test_lora_checkpoint_holds_the_adapters_and_resumes_to_an_identical_step(
    small_vocab_policy_dir, tmp_path
):
    first, second = _batches(small_vocab_policy_dir, 2)
    original = Learner(_config(), small_vocab_policy_dir)
    original.step(first)
    # As the trainer loop writes it (services/trainer/loop.py _checkpoint / _restore).
    state = original.state_dict()
    tensors = {f"policy.{k}": v for k, v in state.pop("policy").items()}
    state.pop("value_head")
    checkpoint.write(tmp_path, Checkpoint(1, 2, tensors, state, positions={}))
    saved = checkpoint.latest(tmp_path)
    assert set(saved.tensors) == {f"policy.{k}" for k in original.adapter_state_dict()}
    base = load_causal_lm(Path(small_vocab_policy_dir), torch.device("cpu"), torch.float32)
    assert saved.trainer_state["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
        "base_blake3": lora.base_fingerprint(base),
    }
    restored = Learner(_config(), small_vocab_policy_dir)
    loaded = dict(saved.trainer_state)
    loaded["policy"] = {k.removeprefix("policy."): v for k, v in saved.tensors.items()}
    loaded["value_head"] = {}
    restored.load_state_dict(loaded)
    expected, got = original.step(second), restored.step(second)
    expected.pop("time/step_s"), got.pop("time/step_s")
    assert got == expected
    a, b = original.adapter_state_dict(), restored.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="learner runs off"):
        Learner(LearnerConfig(algorithm="grpo"), small_vocab_policy_dir).load_state_dict(loaded)
    with pytest.raises(ValueError, match="checkpoint has LoRA"):
        Learner(_config(lora_rank=8), small_vocab_policy_dir).load_state_dict(loaded)
    # The same settings on another base: its adapters would mean something else there.
    with torch.no_grad():
        base.model.norm.weight.add_(1e-3)
    base.save_pretrained(tmp_path / "other-base")
    with pytest.raises(ValueError, match="base weights' BLAKE3"):
        Learner(_config(), tmp_path / "other-base").load_state_dict(loaded)
    full = Learner(LearnerConfig(algorithm="grpo"), small_vocab_policy_dir).state_dict()
    with pytest.raises(ValueError, match="checkpoint has LoRA off"):
        Learner(_config(), small_vocab_policy_dir).load_state_dict(full)


def test_the_pushed_folder_is_the_adapter_and_the_policy_merges_it_to_the_learners_weights(
    small_vocab_policy_dir, tmp_path
):
    from peft import PeftModel
    from safetensors.torch import load_file

    (batch,) = _batches(small_vocab_policy_dir, 1)
    learner = Learner(_config(), small_vocab_policy_dir)
    learner.step(batch)
    folder = write_adapter_version(tmp_path, 2, *learner.adapter_push(base_version=1))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ADAPTER_FILE, PEFT_CONFIG_FILE, "manifest.json"]
    )
    manifest = build_manifest(folder, 2)
    assert list(manifest.file_size) == [ADAPTER_FILE]  # only the adapter is pushed
    full_bytes = (small_vocab_policy_dir / "model.safetensors").stat().st_size
    assert manifest.file_size[ADAPTER_FILE] < full_bytes
    config = read_config(folder / ADAPTER_FILE)
    assert (config.rank, config.alpha, config.base_version) == (4, 8.0, 1)
    assert config.target_modules == ("q_proj", "v_proj")

    # What the policy will serve (services/policy/lora.merge on the base file) is the learner's.
    base = load_file(small_vocab_policy_dir / "model.safetensors")
    served = policy_lora.merge(base, load_file(folder / ADAPTER_FILE), config.scaling)
    mine = learner.policy_state_dict()
    assert set(served) == set(mine)
    for name, tensor in mine.items():
        assert torch.allclose(served[name], tensor, atol=1e-6), name

    # peft itself opens the pushed folder and computes the same model.
    model = load_causal_lm(small_vocab_policy_dir, torch.device("cpu"), torch.float32)
    reopened = PeftModel.from_pretrained(model, folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(reopened(ids).logits, learner.policy(ids).logits, atol=1e-5)


def test_adapter_dropout_is_on_only_in_the_loss_pass(small_vocab_policy_dir):
    (batch,) = _batches(small_vocab_policy_dir, 1)
    learner = Learner(_config(lora_dropout=0.5), small_vocab_policy_dir)
    dropouts = [m for n, m in learner.policy.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and not any(m.training for m in dropouts)
    seen = []
    hook = dropouts[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    learner.step(batch)
    hook.remove()
    assert seen and all(seen)
    assert not any(m.training for m in dropouts)
    no_dropout = copy.deepcopy(learner.policy)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(no_dropout(ids).logits, learner.policy(ids).logits)


def test_settings_turn_lora_on_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_TRAINER_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("RLHF_TRAINER_LORA_RANK", "16")
    monkeypatch.setenv("RLHF_TRAINER_LORA_ALPHA", "32")
    monkeypatch.setenv("RLHF_TRAINER_LORA_TARGET_MODULES", "q_proj, v_proj")
    monkeypatch.setenv("RLHF_TRAINER_LORA_DROPOUT", "0.05")
    settings = TrainerSettings()
    assert settings.lora == {
        "lora_rank": 16,
        "lora_alpha": 32.0,
        "lora_target_modules": ("q_proj", "v_proj"),
        "lora_dropout": 0.05,
    }
    LearnerConfig(algorithm="grpo", **settings.lora).validate()
    monkeypatch.delenv("RLHF_TRAINER_LORA_RANK")
    assert TrainerSettings().lora_rank == 0  # off by default
    with pytest.raises(ValueError, match="lora_dropout"):
        LearnerConfig(lora_rank=4, lora_dropout=1.0).validate()
