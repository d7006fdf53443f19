"""Reward over-optimisation, shown on a tiny policy with the real learner, and the guards that
stop it.

The "gold" score is what people want: the share of response tokens that are TARGET, minus the
share that are EXPLOIT (a token people dislike). The proxy reward model is an ensemble of two
members that agree with gold on ordinary text (no EXPLOIT token) and disagree exactly on the
exploit: one member is gold, the other pays 5x for EXPLOIT. So, per response of n5 TARGET and n7
EXPLOIT tokens out of the RESPONSE_TOKENS budget:

    gold   = (n5 - n7) / 8
    proxy  = mean of members = (n5 + 2 * n7) / 8      (= gold when n7 = 0)
    spread = std of members  = 3 * n7 / 8             (population std of the two)

Guards off, GRPO drives the proxy up by filling responses with EXPLOIT, and gold falls. Guards
on (uncertainty penalty k = 1: proxy - spread = gold), the same data stream and seed raise gold.
A hard KL budget alone (0.1 nats per token) does not know which direction is the exploit, but it
bounds how far the policy, and so the gold score, can move. Seeded throughout, so every run
prints the same figures.

    pytest tests/unit/trainer/test_overoptimisation.py -q -s   # -s prints the figures
"""

from __future__ import annotations

import statistics

import torch

from services.common.models import load_causal_lm
from services.trainer.learner import Learner, LearnerConfig
from tests.support.rollouts import sample_rollouts
from tests.unit.trainer.conftest import EOS, PAD
from tests.unit.trainer.rl_loop import random_prompts

TARGET, EXPLOIT = 5, 7
RESPONSE_TOKENS = 8
STEPS = 20
WINDOW = 4  # steps averaged for the start and end figures


def counts(response: list[int]) -> tuple[int, int]:
    return response.count(TARGET), response.count(EXPLOIT)


def gold(prompt: list[int], response: list[int]) -> float:
    n5, n7 = counts(response)
    return (n5 - n7) / RESPONSE_TOKENS


def members(response: list[int]) -> tuple[float, float]:
    """The two ensemble members: one is gold, one pays 5x for the exploit."""
    n5, n7 = counts(response)
    return (n5 - n7) / RESPONSE_TOKENS, (n5 + 5 * n7) / RESPONSE_TOKENS


def proxy(prompt: list[int], response: list[int]) -> float:
    return statistics.fmean(members(response))


def spread(prompt: list[int], response: list[int]) -> float:
    return statistics.pstdev(members(response))


def train(policy_dir, **guards) -> dict[str, float]:
    """STEPS GRPO updates on fresh rollouts scored by the proxy; start/end proxy and gold."""
    config = LearnerConfig(
        algorithm="grpo", lr=5e-3, kl_coef=0.01, minibatch_size=8, seed=0, **guards
    )
    learner = Learner(config, policy_dir)
    reference = load_causal_lm(policy_dir, torch.device("cpu"), torch.float32)
    prompts = torch.Generator().manual_seed(1)
    history = []
    for step in range(STEPS):
        samples = sample_rollouts(
            learner.policy,
            reference,
            random_prompts(prompts, 4),
            samples_per_prompt=4,
            max_new_tokens=RESPONSE_TOKENS,
            reward_fn=proxy,
            spread_fn=spread,
            gold_fn=gold,
            eos_token_id=EOS,
            pad_id=PAD,
            seed=step,
        )
        history.append(learner.step(samples))

    def window(key: str, part: slice) -> float:
        return statistics.fmean(m[key] for m in history[part])

    start, end = slice(0, WINDOW), slice(-WINDOW, None)
    return {
        "proxy_start": window("reward/mean", start),
        "proxy_end": window("reward/mean", end),
        "gold_start": window("gold/mean", start),
        "gold_end": window("gold/mean", end),
        "spread_end": window("reward/spread_mean", end),
        "kl_end": history[-1]["kl/behaviour_ref_k1"],
        "kl_budget_skips": history[-1].get("guard/kl_budget_skips", 0.0),
    }


def test_guards_off_the_proxy_rises_while_gold_falls_guards_on_gold_rises(small_vocab_policy_dir):
    off = train(small_vocab_policy_dir)
    on = train(small_vocab_policy_dir, uncertainty_penalty=1.0)
    budget = train(small_vocab_policy_dir, kl_budget=0.1)
    for name, run in (
        ("guards off", off),
        ("uncertainty_penalty=1", on),
        ("kl_budget=0.1", budget),
    ):
        print(
            f"\n{name}: proxy {run['proxy_start']:.3f} -> {run['proxy_end']:.3f}, "
            f"gold {run['gold_start']:.3f} -> {run['gold_end']:.3f}, "
            f"spread at the end {run['spread_end']:.3f}, sequence KL {run['kl_end']:.2f}, "
            f"updates undone by the KL budget {run['kl_budget_skips']:.0f}"
        )
    # Same seed, same prompts: every run starts from the same random policy.
    for run in (off, on, budget):
        assert abs(run["gold_start"]) < 0.15
    # Guards off: reward hacking. The proxy rises a lot; the gold score falls.
    assert off["proxy_end"] > off["proxy_start"] + 0.5
    assert off["gold_end"] < off["gold_start"] - 0.5
    # Uncertainty penalty: the gold score does not fall; it rises, and the exploit is abandoned.
    assert on["gold_end"] > on["gold_start"] + 0.2
    assert on["spread_end"] < off["spread_end"] / 3
    # KL budget: updates are undone, the policy stays near the reference, the damage is bounded.
    assert budget["kl_budget_skips"] > 0 and budget["kl_end"] < off["kl_end"] / 4
    assert budget["gold_end"] > budget["gold_start"] - 0.1
    assert budget["proxy_end"] < off["proxy_end"] / 2
