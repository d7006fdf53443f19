"""Pairwise comparison of two policies' answers and its statistics.

Each prompt's two answers go to the judge in a random order, so that a judge that favours the
first (or second) answer it reads cannot favour either policy; the verdict is then mapped back
to candidate/baseline. A tie counts as half a win, in the win-rate and in its interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PreferFn = Callable[[str, str, str], float]
"""prefer(prompt, first, second): 1.0 first better, 0.0 second better, 0.5 a tie; any value in
[0, 1] is the probability that first is better."""


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z = 1.96); (0.0, 1.0) when n is 0.

    `successes` may be fractional (a tie is half a success). Unlike the normal approximation
    p +- z*sqrt(p(1-p)/n), it stays inside [0, 1] and is not empty at p = 0 or 1.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class Comparison:
    """Outcome of the candidate against the baseline over n prompts."""

    wins: int
    """Prompts where the judge preferred the candidate's answer."""
    losses: int
    """Prompts where it preferred the baseline's."""
    ties: int
    """Prompts judged even (a verdict of exactly 0.5)."""
    n: int
    """Prompts judged: wins + losses + ties."""
    win_rate: float
    """(wins + ties / 2) / n; 0.5 when n is 0."""
    ci_low: float
    """Lower end of the 95% Wilson interval of the win-rate."""
    ci_high: float
    """Upper end of the same interval."""

    @classmethod
    def from_counts(cls, wins: int, losses: int, ties: int) -> Comparison:
        n = wins + losses + ties
        successes = wins + ties / 2
        low, high = wilson_interval(successes, n)
        return cls(wins, losses, ties, n, successes / n if n else 0.5, low, high)


def verdict_of(preference: float) -> str:
    """A judge's preference for the first answer as "first", "second" or "tie"."""
    if isinstance(preference, bool) or not isinstance(preference, (int, float)):
        raise TypeError(f"judge returned {preference!r}, not a number in [0, 1]")
    if not 0.0 <= preference <= 1.0:  # also refuses NaN
        raise ValueError(f"judge returned {preference}, not a number in [0, 1]")
    return "first" if preference > 0.5 else "second" if preference < 0.5 else "tie"


def compare(
    prompts: Sequence[str],
    candidate_answers: Sequence[str],
    baseline_answers: Sequence[str],
    prefer: PreferFn,
    rng: random.Random,
) -> tuple[Comparison, list[dict]]:
    """Judges each prompt's pair in an order drawn from `rng`; returns the totals and one record
    per prompt: prompt, candidate, baseline, candidate_first, verdict ("win"/"loss"/"tie", from
    the candidate's side)."""
    if not len(prompts) == len(candidate_answers) == len(baseline_answers):
        raise ValueError(
            f"{len(prompts)} prompts, {len(candidate_answers)} candidate answers and "
            f"{len(baseline_answers)} baseline answers: need one answer of each per prompt"
        )
    records = []
    for prompt, candidate, baseline in zip(prompts, candidate_answers, baseline_answers):
        candidate_first = rng.random() < 0.5
        first, second = (candidate, baseline) if candidate_first else (baseline, candidate)
        seen = verdict_of(prefer(prompt, first, second))
        if seen == "tie":
            verdict = "tie"
        else:
            verdict = "win" if (seen == "first") == candidate_first else "loss"
        records.append(
            {
                "prompt": prompt,
                "candidate": candidate,
                "baseline": baseline,
                "candidate_first": candidate_first,
                "verdict": verdict,
            }
        )
    count = {v: sum(r["verdict"] == v for r in records) for v in ("win", "loss", "tie")}
    return Comparison.from_counts(count["win"], count["loss"], count["tie"]), records
