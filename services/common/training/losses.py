"""The offline stages' losses: pure functions of tensors, registered under a name.

Each returns `(loss, metrics)`, metrics a dict of namespaced floats (`sft/tokens`,
`rewards/margin`). A stage looks its loss up in `LOSSES`; it never branches on the name.
tests/unit/common/training/test_losses.py checks each against a slow, obvious Python reference.

Shapes: `B` batch, `T` tokens, `V` vocabulary, `P` preference pairs, `M` ensemble members.
Sequence log-probabilities (`*_logps`, shape (B,) or (P,)) are sums over completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F

Metrics = dict[str, float]


class LossName(str, Enum):
    SFT = "sft"
    BRADLEY_TERRY = "bradley_terry"
    BRADLEY_TERRY_ENSEMBLE = "bradley_terry_ensemble"
    DPO = "dpo"
    IPO = "ipo"
    KTO = "kto"


LOSSES: dict[LossName, Callable[..., tuple[torch.Tensor, Metrics]]] = {}


def register_loss(name: LossName):
    def register(fn):
        LOSSES[name] = fn
        return fn

    return register


def get_loss(name: str) -> Callable[..., tuple[torch.Tensor, Metrics]]:
    try:
        return LOSSES[LossName(name)]
    except ValueError:
        raise ValueError(
            f"unknown loss {name!r}; registered: {[n.value for n in LOSSES]}"
        ) from None


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1, in float32: (B, T-1)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)


@register_loss(LossName.SFT)
def sft_loss(
    token_logps: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, Metrics]:
    """Mean negative log-likelihood over completion tokens.

    token_logps: (B, T-1) from `token_logprobs`; completion_mask: (B, T-1), 1 where the target
    token is a completion token (the batch's completion_mask shifted by one).
    """
    mask = completion_mask.to(token_logps.dtype)
    tokens = mask.sum()
    loss = -(token_logps * mask).sum() / tokens.clamp(min=1)
    return loss, {"sft/loss": loss.item(), "sft/tokens": tokens.item()}


@register_loss(LossName.BRADLEY_TERRY)
def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> tuple[torch.Tensor, Metrics]:
    """-log sigmoid(r_chosen - r_rejected), mean over pairs; rewards (P,)."""
    margin = chosen_rewards.float() - rejected_rewards.float()  # (P,)
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "reward/loss": loss.item(),
        "reward/accuracy": (margin > 0).float().mean().item(),
        "reward/margin": margin.mean().item(),
    }


@register_loss(LossName.BRADLEY_TERRY_ENSEMBLE)
def ensemble_bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry per ensemble member, each a weighted mean over pairs; mean over members.

    rewards (P, M): member j's reward of each pair's chosen / rejected response.
    pair_weights (P, M): member j's weight of pair i (a bootstrap count times the pair's source
    weight); None is 1 everywhere. Member j's loss is sum_i w_ij * l_ij / sum_i w_ij, so a pair of
    weight 0 changes nothing and a batch whose weights are all 0 for a member adds 0 for it.
    Metrics: `reward/accuracy` and `reward/margin` of the ensemble mean (a tie counts as wrong),
    `reward/spread` the mean over responses of the members' population std, and
    `reward/member_<j>/accuracy`. With M = 1 and no weights this is `bradley_terry_loss`.
    """
    margin = chosen_rewards.float() - rejected_rewards.float()  # (P, M)
    losses = -F.logsigmoid(margin)  # (P, M)
    if pair_weights is None:
        member_losses = losses.mean(dim=0)  # (M,)
    else:
        weights = pair_weights.to(losses.dtype)  # (P, M)
        member_losses = (losses * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)
    loss = member_losses.mean()
    mean_margin = margin.mean(dim=-1)  # (P,) margin of the ensemble mean
    both = torch.cat([chosen_rewards, rejected_rewards]).detach().float()  # (2P, M)
    metrics = {
        "reward/loss": loss.item(),
        "reward/accuracy": (mean_margin > 0).float().mean().item(),
        "reward/margin": mean_margin.mean().item(),
        "reward/spread": both.std(dim=-1, unbiased=False).mean().item(),
    }
    for j, correct in enumerate((margin > 0).float().mean(dim=0).tolist()):
        metrics[f"reward/member_{j}/accuracy"] = correct
    return loss, metrics


def _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen = beta * (policy_chosen - ref_chosen)  # (P,)
    rejected = beta * (policy_rejected - ref_rejected)  # (P,)
    return chosen, rejected


def _preference_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor
) -> Metrics:
    return {
        "dpo/loss": loss.item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margin": (chosen - rejected).mean().item(),
        "rewards/accuracy": (chosen > rejected).float().mean().item(),
    }


@register_loss(LossName.DPO)
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)).

    All four are sequence log-probs (P,); the implicit reward is beta * (policy - reference).
    """
    chosen, rejected = _implicit_rewards(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, _preference_metrics(chosen.detach(), rejected.detach(), loss)


@register_loss(LossName.IPO)
def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2 with h the difference of log-ratios.

    Uses the summed sequence log-probs it is given, as the paper does (TRL averages per token).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (P,)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    chosen, rejected = _implicit_rewards(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    return loss, _preference_metrics(chosen.detach(), rejected.detach(), loss)


@register_loss(LossName.KTO)
def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024), mean over the batch of

        desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))

    with r = log pi(y|x) - log pi_ref(y|x) (B,) and the reference point
    z0 = max(0, mean(kl_policy_logps - kl_ref_logps)), estimated, as in the paper, from
    mismatched (x_i, y_j) pairs of the same batch (`kl_*`, (B,)) and not back-propagated through.
    `desirable` (B,) is the bool label.
    """
    z0 = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    logratio = policy_logps - ref_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))  # (B,)
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))  # (B,)
    loss = torch.where(desirable, desirable_losses, undesirable_losses).mean()
    rewards = (beta * logratio).detach()  # (B,)
    metrics = {"kto/loss": loss.item(), "kto/kl": z0.item()}
    if desirable.any():
        metrics["rewards/desirable"] = rewards[desirable].mean().item()
    if (~desirable).any():
        metrics["rewards/undesirable"] = rewards[~desirable].mean().item()
    return loss, metrics
