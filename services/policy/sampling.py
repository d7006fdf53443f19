"""Per-row sampling for a batch decoding step: logit bias and presence/frequency penalties,
temperature, top-k, top-p, seeded draws, and the log-prob of each drawn token under the
distribution it was actually drawn from.

Pure functions of tensors, shared by the Triton model and by the tests' in-process reference.
Legend: `B` rows of the batch, `V` vocabulary.

The distribution of a row is, with OpenAI's adjustments first,
    adjusted = logits + bias - presence * (count > 0) - frequency * count
(count: times each token was already generated in this row), then
    greedy (temperature < GREEDY_BELOW): softmax(adjusted)  -> argmax, log-prob under it
    otherwise:              softmax(filter(adjusted / T)) with filter = top-k then top-p
so the log-prob returned is log_softmax of the filtered, renormalised logits at the drawn token,
and the top alternatives of a position are the best tokens of that same distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token this row already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time this row already generated it."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Added to the logit of each listed token id."""
    top_logprobs: int = 0
    """How many of the best tokens of each position's distribution to report; 0 none."""


def row_generators(rows: list[RowSampling], device: torch.device) -> list[torch.Generator]:
    gens = []
    for r in rows:
        g = torch.Generator(device=device)
        g.manual_seed(int(r.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def adjusted_logits(
    logits: torch.Tensor,
    counts: torch.Tensor | None,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """OpenAI's logit adjustments: logits + bias - presence * (counts > 0) - frequency * counts.

    logits (B, V) float32; counts (B, V) times each token was generated in the row so far, or
    None when no row has a penalty; presence, frequency (B,); bias (B, V) or None.
    """
    if bias is not None:
        logits = logits + bias
    if counts is not None:
        logits = logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts
    return logits


class LogitAdjustments:
    """The logit bias and presence/frequency penalties of a batch's rows, with the counts of
    the tokens each row generated that the penalties need. Costs nothing when no row asks."""

    def __init__(self, rows: Sequence[RowSampling], vocab: int, device: torch.device):
        batch = len(rows)
        self.presence = torch.tensor([float(r.presence_penalty) for r in rows], device=device)
        self.frequency = torch.tensor([float(r.frequency_penalty) for r in rows], device=device)
        penalised = bool((self.presence != 0).any() or (self.frequency != 0).any())
        self.counts = torch.zeros(batch, vocab, device=device) if penalised else None  # (B, V)
        self.bias = None
        if any(r.logit_bias for r in rows):
            bias = torch.zeros(batch, vocab)  # (B, V), filled on the CPU: one copy to the device
            for i, r in enumerate(rows):
                for token, value in r.logit_bias.items():
                    bias[i, int(token)] = float(value)
            self.bias = bias.to(device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return adjusted_logits(logits, self.counts, self.presence, self.frequency, self.bias)

    def record(self, tokens: torch.Tensor, rows: list[int]) -> None:
        """Counts the token each of `rows` just generated (tokens (B,))."""
        if self.counts is not None and rows:
            index = torch.tensor(rows, device=tokens.device)
            self.counts[index, tokens[index]] += 1

    def select(self, index: torch.Tensor) -> LogitAdjustments:
        """The adjustments of rows `index` (long (b,)), in that order (rows leaving a batch,
        or copies of one row for the samples that share its prompt)."""
        out = LogitAdjustments.__new__(LogitAdjustments)
        out.presence, out.frequency = self.presence[index], self.frequency[index]
        out.counts = None if self.counts is None else self.counts[index]
        out.bias = None if self.bias is None else self.bias[index]
        return out

    def concat(self, other: LogitAdjustments) -> LogitAdjustments:
        """This batch's rows followed by `other`'s (rows joining a running batch)."""
        out = LogitAdjustments.__new__(LogitAdjustments)
        out.presence = torch.cat([self.presence, other.presence])
        out.frequency = torch.cat([self.frequency, other.frequency])
        out.counts = _concat_or_none(
            self.counts, other.counts, len(self.presence), len(other.presence)
        )
        out.bias = _concat_or_none(self.bias, other.bias, len(self.presence), len(other.presence))
        return out


def _concat_or_none(
    a: torch.Tensor | None, b: torch.Tensor | None, rows_a: int, rows_b: int
) -> torch.Tensor | None:
    """Rows of a then b (each (rows, V) or None for all zeros); None when both are None."""
    if a is None and b is None:
        return None
    like = a if a is not None else b
    a = like.new_zeros(rows_a, like.shape[-1]) if a is None else a
    b = like.new_zeros(rows_b, like.shape[-1]) if b is None else b
    return torch.cat([a, b])


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


def log_distribution(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Log-probs (B, V) of the distribution each row samples from (-inf where filtered out)."""
    return torch.log_softmax(filtered_logits(logits.float(), temperature, top_k, top_p), dim=-1)


def draw(
    logprobs: torch.Tensor, temperature: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row (B,) from logprobs (B, V): the argmax where greedy, else a seeded draw."""
    greedy = temperature < GREEDY_BELOW
    tokens = logprobs.argmax(dim=-1)  # (B,)
    if not bool(greedy.all()):
        probs = logprobs.exp()
        for i in torch.nonzero(~greedy).flatten().tolist():
            # Each row draws from its own generator so its stream is independent of the batch.
            tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return tokens


def sample_step(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob: returns (tokens (B,), logprobs (B,))."""
    logprobs = log_distribution(logits, temperature, top_k, top_p)  # (B, V)
    tokens = draw(logprobs, temperature, generators)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def top_alternatives(
    logprobs: torch.Tensor, counts: list[int]
) -> list[tuple[list[int], list[float]]]:
    """The best `counts[i]` tokens of row i's distribution (logprobs (B, V)), best first, as
    (token ids, log-probs); tokens the filters removed (-inf) are left out."""
    k = min(max(counts, default=0), logprobs.shape[-1])
    if k == 0:
        return [([], []) for _ in counts]
    values, ids = logprobs.topk(k, dim=-1)  # (B, k)
    out = []
    for row_values, row_ids, n in zip(values.tolist(), ids.tolist(), counts):
        kept = [(t, v) for t, v in zip(row_ids[:n], row_values[:n]) if v != float("-inf")]
        out.append(([t for t, _ in kept], [v for _, v in kept]))
    return out


def first_stop_string(text: str, stops: list[str]) -> int:
    """Index in `text` where the earliest stop string starts, or -1."""
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else -1
