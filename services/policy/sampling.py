"""Per-row sampling for a batch decoding step: temperature, top-k, top-p, seeded draws, and the
log-prob of each drawn token under the distribution it was actually drawn from.

Pure functions of tensors, shared by the Triton model and by the tests' in-process reference.
Legend: `B` rows of the batch, `V` vocabulary.

The distribution of a row is
    greedy (temperature < GREEDY_BELOW): softmax(logits)  -> argmax, log-prob under it
    otherwise:              softmax(filter(logits / T)) with filter = top-k then top-p
so the log-prob returned is log_softmax of the filtered, renormalised logits at the drawn token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily. Dividing logits by a smaller one (1.4e-45, which an
API client may send) overflows float32 to inf and the softmax to NaN; at 1e-5 the distribution
is already a point mass on the argmax, so greedy is what such a temperature means."""


@dataclass(frozen=True)
class RowSampling:
    """The sampling parameters of one row (one sample of one prompt)."""

    temperature: float
    """0 (or anything below GREEDY_BELOW) is greedy."""
    top_p: float
    """Nucleus mass in (0, 1]; 1 disables."""
    top_k: int
    """0 disables."""
    seed: int
    """Seed of this row's own generator: same seed, same draws whatever else is in the batch."""


def row_generators(rows: list[RowSampling], device: torch.device) -> list[torch.Generator]:
    gens = []
    for r in rows:
        g = torch.Generator(device=device)
        g.manual_seed(int(r.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def filtered_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Logits of the distribution each row samples from, -inf where filtered out.

    logits (B, V) float32; temperature (B,), below GREEDY_BELOW greedy (unscaled and unfiltered);
    top_k (B,) int with 0 = off; top_p (B,) in (0, 1].
    """
    greedy = temperature < GREEDY_BELOW
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / scale[:, None]  # (B, V)
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | greedy, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    p = torch.where(greedy, torch.ones_like(top_p), top_p)
    if bool((k >= vocab).all()) and bool((p >= 1).all()):
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(vocab, device=logits.device)[None, :]  # (1, V)
    drop = ranks >= k[:, None]  # (B, V) top-k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of strictly better tokens
    drop |= mass_before >= p[:, None]  # top-p keeps the smallest prefix reaching p (>= 1 token)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def sample_step(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob: returns (tokens (B,), logprobs (B,))."""
    logits = logits.float()
    filtered = filtered_logits(logits, temperature, top_k, top_p)  # (B, V)
    logprobs = torch.log_softmax(filtered, dim=-1)  # (B, V)
    greedy = temperature < GREEDY_BELOW
    tokens = logprobs.argmax(dim=-1)  # (B,)
    if not bool(greedy.all()):
        probs = logprobs.exp()
        for i in torch.nonzero(~greedy).flatten().tolist():
            # Each row draws from its own generator so its stream is independent of the batch.
            tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def first_stop_string(text: str, stops: list[str]) -> int:
    """Index in `text` where the earliest stop string starts, or -1."""
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else -1
