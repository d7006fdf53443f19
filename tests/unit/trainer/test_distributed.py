"""Two learner ranks (torch.distributed, gloo on CPU) stepping on different rollouts hold
identical weights after every step, because gradients are averaged before each optimizer step;
a batch size that differs between ranks, or a batch one rank refuses, is a clear error on every
rank instead of a hang; the vote behind that agreement tells every rank the smallest and largest
size and whether any rank raised its flag.

    pytest tests/unit/trainer/test_distributed.py -q
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.trainer import distributed
from services.trainer.learner import Learner, LearnerConfig

CONFIG = LearnerConfig(algorithm="ppo", lr=1e-2, minibatch_size=8, seed=0)
STEPS = 2


def _flat(learner: Learner) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in learner._parameters()])


def _rank(rank: int, world: int, policy_dir: str, out_dir: str) -> None:
    from services.common.models import load_causal_lm
    from tests.unit.trainer.rl_loop import random_prompts, rollouts

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    try:
        # Rank 0 votes (4, no flag), rank 1 (8, flag).
        votes = distributed.vote(4 * (rank + 1), flag=rank == 1)
        agreed = [distributed.agree(4, False), distributed.agree(4 * (rank + 1), rank == 0)]
        Path(f"{out_dir}/rank{rank}-votes.json").write_text(json.dumps([asdict(votes), agreed]))
        learner = Learner(CONFIG, policy_dir)
        reference = load_causal_lm(Path(policy_dir), torch.device("cpu"), torch.float32)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own rollouts
        batches = [
            rollouts(learner, reference, random_prompts(generator, 4), seed=100 * rank + s)
            for s in range(STEPS)
        ]
        for step, samples in enumerate(batches):
            learner.step(samples)
            torch.save(_flat(learner), f"{out_dir}/rank{rank}-step{step}.pt")
        error = ""
        try:
            learner.step(batches[0][: 16 - 4 * rank])  # rank 1 brings fewer samples
        except ValueError as exc:
            error = str(exc)
        Path(f"{out_dir}/rank{rank}-error.txt").write_text(error)
        out_of_vocabulary = replace(
            batches[0][-1],
            response_token_ids=[99],
            behaviour_logprobs=[-1.0],
            reference_logprobs=[-1.0],
        )
        bad = [*batches[0][:-1], out_of_vocabulary] if rank else batches[0]
        try:
            learner.step(bad)  # rank 1 brings a token outside the vocabulary
        except ValueError as exc:
            Path(f"{out_dir}/rank{rank}-refusal.txt").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_identical_weights(small_vocab_policy_dir, tmp_path):
    mp.spawn(_rank, args=(2, str(small_vocab_policy_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        votes, agreed = json.loads((tmp_path / f"rank{rank}-votes.json").read_text())
        assert votes == {"smallest": 4, "largest": 8, "flagged": True}
        assert agreed == [[True, False], [False, True]]
    initial = _flat(Learner(CONFIG, small_vocab_policy_dir))
    for step in range(STEPS):
        rank0 = torch.load(tmp_path / f"rank0-step{step}.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"rank1-step{step}.pt", weights_only=True)
        assert torch.equal(rank0, rank1), f"ranks diverged at step {step}"
        assert not torch.equal(rank0, initial)
    for rank in range(2):
        assert (
            "ranks disagree on the batch size" in (tmp_path / f"rank{rank}-error.txt").read_text()
        )
    assert "outside the policy's vocabulary" in (tmp_path / "rank1-refusal.txt").read_text()
    assert "another rank refused" in (tmp_path / "rank0-refusal.txt").read_text()


def _budget_rank(rank: int, world: int, policy_dir: str, out_dir: str) -> None:
    from services.common.models import load_causal_lm
    from tests.unit.trainer.rl_loop import random_prompts, rollouts

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    try:
        reference = load_causal_lm(Path(policy_dir), torch.device("cpu"), torch.float32)
        generator = torch.Generator().manual_seed(200 + rank)  # each rank its own rollouts
        results = {}
        for name, budget in (("tight", 1e-6), ("loose", 10.0)):
            learner = Learner(replace(CONFIG, algorithm="grpo", kl_budget=budget), policy_dir)
            samples = rollouts(learner, reference, random_prompts(generator, 4), seed=rank)
            metrics = learner.step(samples)
            torch.save(_flat(learner), f"{out_dir}/rank{rank}-{name}.pt")
            results[name] = [metrics["guard/kl_budget_skipped"], metrics["kl/policy_ref_after"]]
        Path(f"{out_dir}/rank{rank}-budget.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_ranks_take_the_same_kl_budget_decision(small_vocab_policy_dir, tmp_path):
    """The budget is measured over every rank's tokens, so ranks with different rollouts measure
    the same KL and all undo (or all keep) the step: their weights never diverge."""
    mp.spawn(
        _budget_rank, args=(2, str(small_vocab_policy_dir), str(tmp_path)), nprocs=2, join=True
    )
    results = [json.loads((tmp_path / f"rank{r}-budget.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["tight"][0] == 1.0 and results[0]["loose"][0] == 0.0
    initial = _flat(Learner(replace(CONFIG, algorithm="grpo"), small_vocab_policy_dir))
    tight = [torch.load(tmp_path / f"rank{r}-tight.pt", weights_only=True) for r in range(2)]
    loose = [torch.load(tmp_path / f"rank{r}-loose.pt", weights_only=True) for r in range(2)]
    assert torch.equal(tight[0], initial) and torch.equal(tight[1], initial)
    assert torch.equal(loose[0], loose[1]) and not torch.equal(loose[0], initial)
