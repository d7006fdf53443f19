"""The learner's plumbing: collation, refusal of bad rollouts, log-prob agreement between the
sampler and the trainer (left padding, positions, KV cache), checkpoint round-trip, gradient
accumulation, and the weights it hands to the push.

    pytest tests/unit/trainer/test_learner.py -q
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.models import load_causal_lm
from services.trainer.learner import Learner, LearnerConfig, RolloutSample, collate
from tests.unit.trainer.rl_loop import random_prompts, rollouts


def _sample(**overrides) -> RolloutSample:
    fields = {
        "prompt_token_ids": [3, 4, 5],
        "response_token_ids": [6, 7],
        "behaviour_logprobs": [-1.0, -2.0],
        "reference_logprobs": [-1.5, -2.5],
        "reward": 0.5,
        "group_id": "g",
        "weights_version": 3,
        "rollout_id": "r",
    }
    fields.update(overrides)
    return RolloutSample(**fields)


def test_collate_pads_prompts_left_and_responses_right():
    batch = collate(
        [
            _sample(),
            _sample(
                prompt_token_ids=[9],
                response_token_ids=[1, 2, 3],
                behaviour_logprobs=[-0.1] * 3,
                reference_logprobs=[-0.2] * 3,
                group_id="h",
                reward=-1.0,
            ),
        ],
        pad_id=0,
    )
    assert batch.input_ids.tolist() == [[3, 4, 5, 6, 7, 0], [0, 0, 9, 1, 2, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids[1].tolist()[2:] == [0, 1, 2, 3]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.behaviour_logprobs.tolist()[0] == [-1.0, -2.0, 0.0]
    assert batch.group_index.tolist() == [0, 1] and batch.scores.tolist() == [0.5, -1.0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"response_token_ids": []}, "at least one token"),
        ({"behaviour_logprobs": [-1.0]}, "2 response tokens but 1 behaviour"),
        ({"reward": math.nan}, "not finite"),
        ({"reference_logprobs": [-1.0, math.inf]}, "reference log-probs must be finite"),
        ({"behaviour_logprobs": [-1.0, 0.5]}, "behaviour log-probs must be finite and <= 0"),
        ({"prompt_token_ids": [-1]}, "negative token id"),
    ],
)
def test_bad_rollouts_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        collate([_sample(), _sample(**overrides)], pad_id=0)


def test_out_of_vocabulary_tokens_are_refused(small_vocab_policy_dir):
    learner = Learner(LearnerConfig(algorithm="grpo"), small_vocab_policy_dir)
    with pytest.raises(ValueError, match="outside the policy's vocabulary of 16"):
        learner.step([_sample(response_token_ids=[6, 99])])


def test_bad_config_is_refused(small_vocab_policy_dir):
    with pytest.raises(ValueError, match="unknown algorithm 'dpo'"):
        LearnerConfig(algorithm="dpo").validate()
    with pytest.raises(ValueError, match="lr must be > 0"):
        LearnerConfig(lr=0).validate()
    with pytest.raises(ValueError, match="has no value loss"):
        Learner(LearnerConfig(algorithm="grpo", value_head=True), small_vocab_policy_dir)


@pytest.mark.parametrize(
    "algorithm,kl_mode,present,absent",
    [
        ("ppo", None, ["value/loss", "kl/reward_penalty_mean"], ["kl/loss"]),
        ("ppo", "loss", ["value/loss", "kl/loss"], []),
        ("grpo", None, ["kl/loss"], ["value/loss"]),
        ("rloo", None, ["kl/reward_penalty_mean"], ["kl/loss", "value/loss"]),
        ("grpo", "none", [], ["kl/loss", "value/loss"]),
    ],
)
def test_kl_goes_where_the_algorithm_puts_it(
    small_vocab_policy_dir, algorithm, kl_mode, present, absent
):
    samples = [
        _sample(group_id=f"g{i // 2}", reward=float(i), rollout_id=str(i)) for i in range(4)
    ]  # reference log-probs differ from behaviour ones: KL is not 0
    config = LearnerConfig(algorithm=algorithm, kl_mode=kl_mode, kl_coef=0.1)
    metrics = Learner(config, small_vocab_policy_dir).step(samples)
    for key in present:
        assert metrics[key] > 0, key
    for key in absent:
        assert key not in metrics or metrics[key] == 0, key
    with pytest.raises(ValueError, match="unknown kl_mode 'both'; known: reward, loss, none"):
        LearnerConfig(kl_mode="both").validate()


def test_trainer_log_probs_equal_the_samplers(tiny_lm_dir):
    # The real SmolLM2 architecture and vocabulary; prompts of different lengths (left padding).
    learner = Learner(LearnerConfig(algorithm="ppo"), tiny_lm_dir)
    reference = load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32)
    prompts = [[1, 520, 33, 9001], [700], [42, 43]]
    samples = rollouts(learner, reference, prompts, seed=0, samples_per_prompt=2)
    batch = collate(samples, pad_id=learner._pad_id())
    with torch.no_grad():
        logprobs, _, values = learner._forward(batch, need_entropy=False)
    assert torch.allclose(logprobs, batch.behaviour_logprobs, atol=1e-4)
    # The reference is a copy of the initial policy, so its log-probs agree as well.
    assert torch.allclose(batch.reference_logprobs, batch.behaviour_logprobs, atol=1e-4)
    assert values.abs().max() == 0  # the value head starts at zero
    metrics = learner.step(samples)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["kl/behaviour_ref_k1"] == pytest.approx(0.0, abs=1e-3)


def _stream(policy_dir, seed: int, steps: int, samples_per_prompt: int = 4):
    """Rollouts from the initial policy (fixed data, so two learners can be fed the same)."""
    learner = Learner(LearnerConfig(algorithm="grpo"), policy_dir)
    reference = load_causal_lm(policy_dir, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    return [
        rollouts(
            learner,
            reference,
            random_prompts(generator, 4),
            seed=s,
            samples_per_prompt=samples_per_prompt,
        )
        for s in range(steps)
    ]


def _params(learner: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner._parameters()]


def test_state_round_trip_gives_an_identical_next_step(small_vocab_policy_dir):
    config = LearnerConfig(
        algorithm="ppo",
        lr=1e-3,
        lr_warmup_steps=3,
        ppo_epochs=2,
        minibatch_size=6,
        kl_control="adaptive",
        target_kl=0.01,
        kl_horizon=100,
        seed=7,
    )
    first, second = _stream(small_vocab_policy_dir, seed=1, steps=2)
    original = Learner(config, small_vocab_policy_dir)
    original.step(first)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = Learner(config, small_vocab_policy_dir)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.kl_controller.value == original.kl_controller.value != config.kl_coef
    expected, got = original.step(second), restored.step(second)
    expected.pop("time/step_s"), got.pop("time/step_s")
    assert got == expected
    for a, b in zip(_params(original), _params(restored), strict=False):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="checkpoint is for 'ppo'"):
        Learner(LearnerConfig(algorithm="rloo"), small_vocab_policy_dir).load_state_dict(
            original.state_dict()
        )


def test_micro_batches_accumulate_to_the_same_update(small_vocab_policy_dir):
    (samples,) = _stream(small_vocab_policy_dir, seed=2, steps=1)
    results = []
    for micro in (None, 3):
        config = LearnerConfig(
            algorithm="ppo", lr=1e-3, minibatch_size=8, micro_batch_size=micro, seed=0
        )
        learner = Learner(config, small_vocab_policy_dir)
        metrics = learner.step(samples)
        results.append((metrics, _params(learner)))
    (whole, whole_params), (micro, micro_params) = results
    for key in ("policy/loss", "value/loss", "optim/grad_norm", "policy/entropy"):
        assert micro[key] == pytest.approx(whole[key], abs=1e-5)
    for a, b in zip(whole_params, micro_params, strict=False):
        assert torch.allclose(a, b, atol=1e-6)


def test_policy_state_dict_is_ready_for_the_weight_push(tiny_lm_dir, tmp_path):
    learner = Learner(LearnerConfig(algorithm="grpo", lr=1e-2), tiny_lm_dir)
    reference = load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32)
    learner.step(rollouts(learner, reference, [[1, 2, 3]], seed=0))
    weights = learner.policy_state_dict()
    assert (
        "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    )  # tied: stored once
    assert all(t.device.type == "cpu" for t in weights.values())
    save_file(
        weights, tmp_path / "model.safetensors"
    )  # refuses shared tensors, so this checks it too
    reference.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, learner.policy(ids).logits)
