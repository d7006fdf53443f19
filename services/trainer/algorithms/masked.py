"""Statistics over the valid tokens of padded response tensors.

Legend: `B` batch (sequences), `A` response tokens (padded). A response mask is 1.0 on tokens
that count and 0.0 on padding; every function here ignores the padded entries completely.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set (over everything, or along `dim`)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is set; an all-padding row gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all valid entries (Bessel-corrected by default, as torch.var)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    sum_sq = masked_sum((values - mean) ** 2, mask)
    if unbiased:
        if count < 2:
            raise ValueError("an unbiased variance needs at least 2 valid entries")
        return sum_sq / (count - 1)
    return sum_sq / count.clamp(min=1.0)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / std over the valid entries; padding comes back as 0.

    With `shift_mean=False` the mean is added back (scale-only whitening, used for rewards).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row: (B, A) -> (B,). Rows must have one."""
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (A,)
    return torch.where(mask > 0, positions, -1).amax(dim=-1)  # (B,)
