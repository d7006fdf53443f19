"""In-process sampling of scored rollouts: what the rollout worker does with the policy, reward
and reference services, in one process, for learning tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.policy.generation import Row, generate_rows
from services.policy.sampling import RowSampling
from services.trainer.rollouts import RolloutSample, collate, response_logprobs


@torch.no_grad()
def sample_rollouts(
    policy,
    reference,
    prompts: list[list[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    reward_fn: Callable[[list[int], list[int]], float],
    eos_token_id: int | None,
    spread_fn: Callable[[list[int], list[int]], float] | None = None,
    gold_fn: Callable[[list[int], list[int]], float] | None = None,
    pad_id: int,
    temperature: float = 1.0,
    seed: int = 0,
    weights_version: int = 0,
    group_prefix: str = "g",
) -> list[RolloutSample]:
    """Samples `samples_per_prompt` responses per prompt from `policy`, recording the behaviour
    log-probs of the sampled tokens, scores them with `reward_fn(prompt_ids, response_ids)` and
    adds reference log-probs from the frozen `reference`: what the rollout worker does with
    the policy, reward and reference services, in one process, through the policy's decoding
    loop (services.policy.generation). `spread_fn` gives each sample its reward-ensemble spread
    (else 0) and `gold_fn` its gold score (else none), as the worker records them.
    """
    prompt_rows = [list(p) for p in prompts for _ in range(samples_per_prompt)]
    # The policy service's own decoding loop, each row with its own seeded generator.
    rows = generate_rows(
        policy,
        [
            Row(
                p,
                max_new_tokens,
                RowSampling(temperature, top_p=1.0, top_k=0, seed=seed * len(prompt_rows) + i),
            )
            for i, p in enumerate(prompt_rows)
        ],
        pad_id=pad_id,
        eos_ids=set() if eos_token_id is None else {eos_token_id},
        decode=lambda ids: "",  # no stop strings
    )
    samples = []
    for i, (prompt, row) in enumerate(zip(prompt_rows, rows)):
        group = i // samples_per_prompt
        samples.append(
            RolloutSample(
                prompt_token_ids=prompt,
                response_token_ids=row.tokens,
                behaviour_logprobs=row.logprobs,
                reference_logprobs=[0.0] * len(row.tokens),  # filled below
                reward=float(reward_fn(prompt, row.tokens)),
                group_id=f"{group_prefix}{group}",
                weights_version=weights_version,
                rollout_id=f"{group_prefix}{group}-{i % samples_per_prompt}",
                reward_spread=float(spread_fn(prompt, row.tokens)) if spread_fn else 0.0,
                gold_score=float(gold_fn(prompt, row.tokens)) if gold_fn else None,
            )
        )
    batch = collate(samples, pad_id).to(next(reference.parameters()).device)
    reference_logprobs = response_logprobs(reference, batch, temperature).cpu()  # (B, A)
    for i, sample in enumerate(samples):
        sample.reference_logprobs = reference_logprobs[i, : len(sample.response_token_ids)].tolist()
    return samples
