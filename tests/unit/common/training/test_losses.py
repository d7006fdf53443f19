"""The offline losses against slow, obvious float64 references (Python loops over `math`)."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.training.losses import LOSSES, LossName, get_loss, token_logprobs

TOL = 1e-6


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_loss_name_is_registered():
    assert set(LOSSES) == set(LossName)
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        get_loss("ppo")


def test_token_logprobs_match_a_loop_over_softmax():
    logits, ids = (
        _random(2, 5, 7, seed=0),
        torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1)),
    )
    got = token_logprobs(logits, ids)
    for b in range(2):
        for t in range(1, 5):
            row = logits[b, t - 1].tolist()
            expected = row[ids[b, t]] - math.log(sum(math.exp(v) for v in row))
            assert abs(got[b, t - 1].item() - expected) < TOL


def test_sft_loss_is_the_mean_nll_over_completion_tokens_only():
    logps = -_random(3, 6, seed=2).abs()
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    loss, metrics = get_loss("sft")(logps, mask)
    picked = [-logps[b, t].item() for b in range(3) for t in range(6) if mask[b, t]]
    assert abs(loss.item() - sum(picked) / len(picked)) < TOL
    assert metrics["sft/tokens"] == len(picked)


def test_bradley_terry_loss():
    chosen, rejected = _random(9, seed=3), _random(9, seed=4)
    loss, metrics = get_loss("bradley_terry")(chosen, rejected)
    expected = (
        sum(-math.log(_sigmoid(c - r)) for c, r in zip(chosen.tolist(), rejected.tolist())) / 9
    )
    assert abs(loss.item() - expected) < TOL
    assert metrics["reward/accuracy"] == pytest.approx(
        sum(c > r for c, r in zip(chosen.tolist(), rejected.tolist())) / 9
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss(beta):
    pc, pr, rc, rr = (_random(7, seed=s) for s in (5, 6, 7, 8))
    loss, metrics = get_loss("dpo")(pc, pr, rc, rr, beta)
    expected, margins = 0.0, []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        margin = beta * ((a - c) - (b - d))
        margins.append(margin)
        expected += -math.log(_sigmoid(margin)) / 7
    assert abs(loss.item() - expected) < TOL
    assert abs(metrics["rewards/margin"] - sum(margins) / 7) < TOL


def test_ipo_loss():
    beta = 0.2
    pc, pr, rc, rr = (_random(6, seed=s) for s in (9, 10, 11, 12))
    loss, _ = get_loss("ipo")(pc, pr, rc, rr, beta)
    expected = (
        sum(
            ((a - c) - (b - d) - 1 / (2 * beta)) ** 2
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
        )
        / 6
    )
    assert abs(loss.item() - expected) < TOL


@pytest.mark.parametrize("kl_shift", [0.5, -3.0])  # a positive KL estimate, and one clamped to 0
def test_kto_loss(kl_shift):
    beta, w_d, w_u = 0.3, 1.0, 1.5
    policy, ref = _random(8, seed=13), _random(8, seed=14)
    kl_policy, kl_ref = _random(8, seed=15) + kl_shift, _random(8, seed=16)
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    loss, metrics = get_loss("kto")(policy, ref, kl_policy, kl_ref, desirable, beta, w_d, w_u)
    z0 = max(0.0, sum(a - b for a, b in zip(kl_policy.tolist(), kl_ref.tolist())) / 8)
    expected = 0.0
    for p, r, good in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
        expected += (
            w_d * (1 - _sigmoid(beta * ((p - r) - z0)))
            if good
            else w_u * (1 - _sigmoid(beta * (z0 - (p - r))))
        ) / 8
    assert abs(loss.item() - expected) < TOL
    assert abs(metrics["kto/kl"] - z0) < TOL


def test_kto_reference_point_gets_no_gradient():
    policy = _random(4, seed=17).requires_grad_()
    kl_policy = _random(4, seed=18).add(2.0).requires_grad_()
    loss, _ = get_loss("kto")(
        policy,
        torch.zeros(4, dtype=torch.float64),
        kl_policy,
        torch.zeros(4, dtype=torch.float64),
        torch.tensor([True, False, True, False]),
        0.1,
    )
    loss.backward()
    assert kl_policy.grad is None and policy.grad is not None
