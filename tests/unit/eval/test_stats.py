"""The Wilson interval against hand-computed values, and `compare` against hand-made judges:
the verdicts are mapped back from the order the judge saw, and that order is random."""

from __future__ import annotations

import math
import random

import pytest

from services.eval.stats import Comparison, compare, wilson_interval


def by_length(prompt: str, first: str, second: str) -> float:
    """Prefers the longer answer; equal lengths tie."""
    return 1.0 if len(first) > len(second) else 0.0 if len(first) < len(second) else 0.5


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        # p = 0.7: centre (0.7 + 1.96^2/20) / (1 + 1.96^2/10) = 0.64449, half-width 0.24772
        (7, 10, (0.3968, 0.8922)),
        (0, 10, (0.0, 0.2775)),  # upper end z^2 / (n + z^2)
        (10, 10, (0.7225, 1.0)),
        (2.5, 5, (0.1704, 0.8296)),  # ties count half: 5 ties of 5
        (5000, 10000, (0.4902, 0.5098)),
    ],
)
def test_wilson_interval_matches_hand_computed_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_without_trials_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_approaches_the_normal_one_for_large_n():
    n, p = 1_000_000, 0.3
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    low, high = wilson_interval(p * n, n)
    assert low == pytest.approx(p - half, abs=1e-6) and high == pytest.approx(p + half, abs=1e-6)


@pytest.mark.parametrize(("successes", "n"), [(-1, 10), (11, 10), (1, -1)])
def test_wilson_interval_refuses_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson_interval(successes, n)


PAIRS = [  # (candidate, baseline, verdict for the candidate under `by_length`)
    ("aaa", "a", "win"),
    ("a", "aaa", "loss"),
    ("bb", "cc", "tie"),
    ("a longer answer", "short", "win"),
    ("x", "xx", "loss"),
    ("same", "same", "tie"),
    ("abcd", "abc", "win"),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compare_counts_wins_losses_and_ties_whatever_the_order(seed):
    prompts = [f"q{i}" for i in range(len(PAIRS))]
    candidates, baselines, verdicts = zip(*PAIRS)

    result, records = compare(prompts, candidates, baselines, by_length, random.Random(seed))

    assert (result.wins, result.losses, result.ties, result.n) == (3, 2, 2, 7)
    assert result.win_rate == pytest.approx((3 + 2 / 2) / 7)
    assert (result.ci_low, result.ci_high) == wilson_interval(4, 7)
    assert [r["verdict"] for r in records] == list(verdicts)
    assert [(r["prompt"], r["candidate"], r["baseline"]) for r in records] == list(
        zip(prompts, candidates, baselines)
    )


def test_the_order_is_random_and_a_position_biased_judge_favours_no_one():
    seen = []

    def always_first(prompt: str, first: str, second: str) -> float:
        seen.append((first, second))
        return 1.0

    n = 200
    candidates = [f"candidate {i}" for i in range(n)]
    baselines = [f"baseline {i}" for i in range(n)]

    result, records = compare(
        [f"q{i}" for i in range(n)], candidates, baselines, always_first, random.Random(0)
    )

    shown_first = sum(r["candidate_first"] for r in records)
    assert 0 < shown_first < n  # both orders occur
    # The judge saw each pair in the recorded order, and "first" is a win exactly when the
    # candidate was shown first.
    assert seen == [
        (c, b) if r["candidate_first"] else (b, c)
        for c, b, r in zip(candidates, baselines, records)
    ]
    assert (result.wins, result.losses, result.ties) == (shown_first, n - shown_first, 0)
    assert result.win_rate == shown_first / n
    assert abs(result.win_rate - 0.5) < 0.1  # not 1.0
    assert result.ci_low < 0.5 < result.ci_high


def test_the_same_seed_gives_the_same_order():
    args = (["q"] * 50, ["a"] * 50, ["b"] * 50, by_length)
    first = compare(*args, random.Random(7))[1]
    again = compare(*args, random.Random(7))[1]
    other = compare(*args, random.Random(8))[1]
    assert first == again
    assert [r["candidate_first"] for r in first] != [r["candidate_first"] for r in other]


@pytest.mark.parametrize(
    ("preference", "candidate_first", "verdict"),
    [
        (0.7, True, "win"),
        (0.7, False, "loss"),
        (0.3, True, "loss"),
        (0.3, False, "win"),
        (0.5, True, "tie"),
        (0.5, False, "tie"),
    ],
)
def test_a_probability_is_a_verdict_for_the_side_above_one_half(
    preference, candidate_first, verdict
):
    # compare shows the candidate first when the rng's next draw is below 0.5.
    seed = next(s for s in range(100) if (random.Random(s).random() < 0.5) == candidate_first)

    _, records = compare(["q"], ["cand"], ["base"], lambda p, a, b: preference, random.Random(seed))

    assert records[0]["candidate_first"] is candidate_first
    assert records[0]["verdict"] == verdict


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "yes", None, True])
def test_a_verdict_outside_zero_to_one_is_refused(bad):
    with pytest.raises((TypeError, ValueError), match="judge returned"):
        compare(["q"], ["a"], ["b"], lambda p, a, b: bad, random.Random(0))


def test_answers_must_pair_up_with_prompts():
    with pytest.raises(ValueError, match="one answer of each per prompt"):
        compare(["q1", "q2"], ["a"], ["b", "c"], by_length, random.Random(0))


def test_no_prompts_is_an_even_comparison_with_no_evidence():
    result, records = compare([], [], [], by_length, random.Random(0))
    assert records == []
    assert result == Comparison(0, 0, 0, 0, 0.5, 0.0, 1.0)
