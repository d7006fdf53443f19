"""The RL math against slow, obvious references on random float64 tensors (Python loops over
tokens and groups, hand-written formulas), padded and holed masks included.

    pytest tests/unit/trainer/test_algorithms.py -q
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from services.trainer.algorithms import (
    ADVANTAGE_ESTIMATORS,
    ALGORITHMS,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    AdaptiveKLController,
    kl_loss,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
)

TOL = 1e-6
B, A = 7, 9


def _random(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, A, generator=g, dtype=torch.float64) * 3  # log-probs in (-3, 0]
    logq = -torch.rand(B, A, generator=g, dtype=torch.float64) * 3
    # Right padding of varying length, one row with a hole in the middle, one full row.
    lengths = torch.randint(1, A + 1, (B,), generator=g)
    lengths[0] = A
    mask = (torch.arange(A)[None, :] < lengths[:, None]).to(torch.float64)
    mask[1] = 1.0
    mask[1, 3:5] = 0.0
    return g, logp, logq, mask


def _valid(mask: torch.Tensor, i: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[i, t] > 0]


def test_kl_estimators_match_their_definitions():
    _, logp, logq, _ = _random()
    definitions = {
        "k1": lambda p, q: p - q,
        "k2": lambda p, q: 0.5 * (p - q) ** 2,
        "k3": lambda p, q: math.exp(q - p) - 1 - (q - p),
    }
    for name, definition in definitions.items():
        got = KL_ESTIMATORS.get(name)(logp, logq)
        for i in range(B):
            for t in range(A):
                assert got[i, t].item() == pytest.approx(
                    definition(logp[i, t].item(), logq[i, t].item()), abs=TOL
                )
    assert (KL_ESTIMATORS.get("k3")(logp, logq) >= 0).all() and (
        KL_ESTIMATORS.get("k2")(logp, logq) >= 0
    ).all()
    # k3 stays finite where the reference thinks the token impossible.
    assert torch.isfinite(KL_ESTIMATORS.get("k3")(torch.tensor([0.0]), torch.tensor([-1e4]))).all()


def test_k1_and_k3_estimate_the_true_kl():
    # Sampling from p: E[k1] = E[k3] = KL(p || q) for two categorical distributions.
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    true_kl = float((p * (p.log() - q.log())).sum())
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=g)
    for name in ("k1", "k3"):
        estimate = KL_ESTIMATORS.get(name)(p.log()[tokens], q.log()[tokens]).mean().item()
        assert estimate == pytest.approx(true_kl, abs=0.01)


def test_masked_statistics():
    _g, values, _, mask = _random(1)
    for i in range(B):
        row = [values[i, t].item() for t in _valid(mask, i)]
        assert masked_mean(values, mask, dim=-1)[i].item() == pytest.approx(
            statistics.fmean(row), abs=TOL
        )
    flat = [values[i, t].item() for i in range(B) for t in _valid(mask, i)]
    assert masked_mean(values, mask).item() == pytest.approx(statistics.fmean(flat), abs=TOL)
    assert masked_var(values, mask).item() == pytest.approx(statistics.variance(flat), abs=TOL)
    whitened = masked_whiten(values, mask)
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    for i in range(B):
        for t in range(A):
            expected = (
                (values[i, t].item() - mean) / math.sqrt(std**2 + 1e-8) if mask[i, t] else 0.0
            )
            assert whitened[i, t].item() == pytest.approx(expected, abs=TOL)
    unshifted = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(unshifted, mask).item() == pytest.approx(mean, abs=TOL)
    assert last_token_index(mask).tolist() == [max(_valid(mask, i)) for i in range(B)]
    assert (
        masked_mean(values, torch.zeros_like(mask), dim=-1).abs().max() == 0
    )  # empty row: 0, not NaN


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_a_python_loop(gamma, lam):
    _g, rewards, values, mask = _random(2)
    advantages, returns = ADVANTAGE_ESTIMATORS.get("gae")(
        token_level_rewards=rewards, response_mask=mask, values=values, gamma=gamma, lam=lam
    )
    for i in range(B):
        steps = _valid(mask, i)  # GAE runs over the valid tokens only, in order
        last_gae = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = values[i, steps[k + 1]].item() if k + 1 < len(steps) else 0.0
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            last_gae = delta + gamma * lam * last_gae
            assert advantages[i, t].item() == pytest.approx(last_gae, abs=TOL)
            assert returns[i, t].item() == pytest.approx(last_gae + values[i, t].item(), abs=TOL)
        for t in set(range(A)) - set(steps):
            assert advantages[i, t].item() == 0.0 and returns[i, t].item() == 0.0


def _groups(index: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, group in enumerate(index):
        groups.setdefault(group, []).append(i)
    return groups


# Group 30 has one sample (no baseline); ids need not be contiguous.
GROUP_INDEX = [4, 4, 4, 9, 9, 30, 4]


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_explicit_group_loops(norm_by_std):
    _, rewards, _, mask = _random(4)
    advantages, returns = ADVANTAGE_ESTIMATORS.get("grpo")(
        token_level_rewards=rewards,
        response_mask=mask,
        group_index=torch.tensor(GROUP_INDEX),
        norm_by_std=norm_by_std,
    )
    scores = [sum(rewards[i, t].item() for t in _valid(mask, i)) for i in range(B)]
    for members in _groups(GROUP_INDEX).values():
        group_scores = [scores[i] for i in members]
        for i in members:
            if len(members) == 1:
                expected = 0.0
            elif norm_by_std:
                expected = (scores[i] - statistics.fmean(group_scores)) / (
                    statistics.stdev(group_scores) + 1e-6
                )
            else:
                expected = scores[i] - statistics.fmean(group_scores)
            for t in range(A):
                assert advantages[i, t].item() == pytest.approx(
                    expected * mask[i, t].item(), abs=TOL
                )
    assert torch.equal(advantages, returns)


def test_rloo_matches_explicit_leave_one_out():
    _, rewards, _, mask = _random(5)
    advantages, _ = ADVANTAGE_ESTIMATORS.get("rloo")(
        token_level_rewards=rewards, response_mask=mask, group_index=torch.tensor(GROUP_INDEX)
    )
    scores = [sum(rewards[i, t].item() for t in _valid(mask, i)) for i in range(B)]
    for members in _groups(GROUP_INDEX).values():
        for i in members:
            others = [scores[j] for j in members if j != i]
            expected = scores[i] - statistics.fmean(others) if others else 0.0
            for t in range(A):
                assert advantages[i, t].item() == pytest.approx(
                    expected * mask[i, t].item(), abs=TOL
                )


def test_outcome_estimators_need_groups():
    _, rewards, _, mask = _random()
    with pytest.raises(ValueError, match="group_index"):
        ADVANTAGE_ESTIMATORS.get("grpo")(
            token_level_rewards=rewards, response_mask=mask, group_index=None
        )


@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.1, 0.28)])
def test_ppo_clipped_surrogate_by_hand(clip_low, clip_high):
    g, behaviour, _, mask = _random(6)
    logprobs = behaviour + 0.4 * torch.randn(
        B, A, generator=g, dtype=torch.float64
    )  # ratios well past the clip
    advantages = torch.randn(B, A, generator=g, dtype=torch.float64)
    loss, metrics = POLICY_LOSSES.get("ppo_clip")(
        logprobs, behaviour, advantages, mask, clip_low, clip_high
    )
    total, clipped_count, count = 0.0, 0, 0
    for i in range(B):
        for t in _valid(mask, i):
            ratio = math.exp(logprobs[i, t].item() - behaviour[i, t].item())
            adv = advantages[i, t].item()
            clipped_ratio = min(max(ratio, 1 - clip_low), 1 + clip_high)
            total += max(-adv * ratio, -adv * clipped_ratio)
            clipped_count += -adv * clipped_ratio > -adv * ratio
            count += 1
    assert loss.item() == pytest.approx(total / count, abs=TOL)
    assert metrics["policy/clipfrac"] == pytest.approx(clipped_count / count, abs=TOL)
    assert 0 < clipped_count < count


def test_ppo_gradient_is_zero_exactly_where_clipped():
    g, behaviour, _, mask = _random(7)
    logprobs = (
        behaviour + 0.5 * torch.randn(B, A, generator=g, dtype=torch.float64)
    ).requires_grad_(True)
    advantages = torch.randn(B, A, generator=g, dtype=torch.float64)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(logprobs, behaviour, advantages, mask, 0.2, 0.2)
    loss.backward()
    n = mask.sum().item()
    for i in range(B):
        for t in range(A):
            ratio = math.exp(logprobs[i, t].item() - behaviour[i, t].item())
            adv = advantages[i, t].item()
            clipped_active = (adv > 0 and ratio > 1.2) or (adv < 0 and ratio < 0.8)
            expected = 0.0 if (clipped_active or not mask[i, t]) else -adv * ratio / n
            assert logprobs.grad[i, t].item() == pytest.approx(expected, abs=TOL)


def test_clipped_value_loss_by_hand():
    g, values, returns, mask = _random(8)
    old_values = values + 0.5 * torch.randn(B, A, generator=g, dtype=torch.float64)
    loss, metrics = VALUE_LOSSES.get("clipped_mse")(values, old_values, returns, mask, 0.2)
    total, clipped, count = 0.0, 0, 0
    for i in range(B):
        for t in _valid(mask, i):
            v, v_old, ret = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
            total += max((v - ret) ** 2, (v_clipped - ret) ** 2)
            clipped += (v_clipped - ret) ** 2 > (v - ret) ** 2
            count += 1
    assert loss.item() == pytest.approx(0.5 * total / count, abs=TOL)
    assert metrics["value/clipfrac"] == pytest.approx(clipped / count, abs=TOL)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalised_rewards_put_the_score_at_the_last_token(estimator):
    g, behaviour, reference, mask = _random(9)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rewards, metrics = kl_penalized_rewards(
        scores, behaviour, reference, mask, kl_coef=0.3, estimator=estimator
    )
    kl = KL_ESTIMATORS.get(estimator)
    for i in range(B):
        valid = _valid(mask, i)
        for t in range(A):
            expected = -0.3 * kl(behaviour[i, t], reference[i, t]).item() if t in valid else 0.0
            if t == valid[-1]:
                expected += scores[i].item()
            assert rewards[i, t].item() == pytest.approx(expected, abs=TOL)
    sequence_kl = [
        sum(kl(behaviour[i, t], reference[i, t]).item() for t in _valid(mask, i)) for i in range(B)
    ]
    assert metrics["kl/sequence_mean"] == pytest.approx(statistics.fmean(sequence_kl), abs=TOL)


def test_kl_loss_is_the_token_mean_of_k3():
    _, logp, logq, mask = _random(10)
    loss, _ = kl_loss(logp, logq, mask, "k3")
    values = [
        math.exp(logq[i, t].item() - logp[i, t].item())
        - 1
        - (logq[i, t].item() - logp[i, t].item())
        for i in range(B)
        for t in _valid(mask, i)
    ]
    assert loss.item() == pytest.approx(statistics.fmean(values), abs=TOL)


def test_kl_controllers():
    fixed = KL_CONTROLLERS.get("fixed")(0.1, 6.0, 10_000)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = KL_CONTROLLERS.get("adaptive")(0.1, 6.0, 10_000)
    adaptive.update(9.0, 64)  # error = clip(9/6 - 1, -0.2, 0.2) = 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000), abs=1e-12)
    adaptive.update(5.4, 64)  # error = -0.1
    assert adaptive.value == pytest.approx(
        0.1 * (1 + 0.2 * 64 / 10_000) * (1 - 0.1 * 64 / 10_000), abs=1e-12
    )
    restored = AdaptiveKLController(1.0, 6.0, 10_000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10_000)


def test_registries_name_what_they_know():
    assert set(ALGORITHMS.names_registered()) == {"ppo", "grpo", "rloo"}
    assert (
        ALGORITHMS.get("grpo").value_loss is None and ALGORITHMS.get("ppo").value_loss is not None
    )
    with pytest.raises(
        ValueError, match="unknown advantage estimator 'vtrace'; known: gae, grpo, rloo"
    ):
        ADVANTAGE_ESTIMATORS.get("vtrace")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        KL_ESTIMATORS.get("k4")
