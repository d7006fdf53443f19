"""The in-process RL loop the learning tests and the learner tests share: sample prompts, sample
rollouts from the learner's policy, score them with a programmatic reward, step."""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.models import load_causal_lm
from services.trainer.learner import Learner, LearnerConfig, RolloutSample
from tests.support.rollouts import sample_rollouts
from tests.unit.trainer.conftest import EOS, PAD, VOCAB

TARGET_TOKEN = 5
RESPONSE_TOKENS = 8


def target_fraction(prompt: list[int], response: list[int]) -> float:
    """The reward: the fraction of the RESPONSE_TOKENS budget spent on TARGET_TOKEN."""
    return sum(token == TARGET_TOKEN for token in response) / RESPONSE_TOKENS


def random_prompts(generator: torch.Generator, count: int) -> list[list[int]]:
    """`count` prompts of 2 to 5 tokens, never EOS/padding."""
    lengths = torch.randint(2, 6, (count,), generator=generator).tolist()
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def rollouts(
    learner: Learner, reference, prompts, seed: int, samples_per_prompt: int = 4
) -> list[RolloutSample]:
    return sample_rollouts(
        learner.policy,
        reference,
        prompts,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=RESPONSE_TOKENS,
        reward_fn=target_fraction,
        eos_token_id=EOS,
        pad_id=PAD,
        seed=seed,
    )


def run_rl(
    policy_dir: Path, config: LearnerConfig, steps: int, prompts_per_step: int = 4
) -> list[dict[str, float]]:
    """`steps` RL updates from fresh rollouts; returns each step's metrics."""
    learner = Learner(config, policy_dir)
    reference = load_causal_lm(policy_dir, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(config.seed + 1)
    history = []
    for step in range(steps):
        samples = rollouts(
            learner, reference, random_prompts(generator, prompts_per_step), seed=step
        )
        history.append(learner.step(samples))
    return history
