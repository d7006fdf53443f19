"""Sampling math against a slow, obvious per-row reference."""

from __future__ import annotations

import math

import pytest
import torch

from services.policy.sampling import (
    RowSampling,
    filtered_logits,
    first_stop_string,
    row_generators,
    sample_step,
)


def reference_logprobs(
    logits: list[float], temperature: float, top_k: int, top_p: float
) -> list[float]:
    """One row by hand: scale, keep the k best, keep the smallest prefix whose mass reaches p."""
    if temperature == 0:
        z = math.log(sum(math.exp(x) for x in logits))
        return [x - z for x in logits]
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[:top_k] if top_k > 0 else order
    z = sum(math.exp(scaled[i]) for i in keep)
    kept, mass = [], 0.0
    for i in keep:
        if mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(scaled[i]) / z
    z = math.log(sum(math.exp(scaled[i]) for i in kept))
    kept = set(kept)
    return [scaled[i] - z if i in kept else -math.inf for i in range(len(scaled))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 7, 0.6), (2.0, 1, 1.0)],
)
def test_filtered_distribution_equals_reference(temperature, top_k, top_p):
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    B = logits.shape[0]
    got = torch.log_softmax(
        filtered_logits(
            logits, torch.full((B,), temperature), torch.full((B,), top_k), torch.full((B,), top_p)
        ),
        dim=-1,
    )
    for b in range(B):
        expected = torch.tensor(reference_logprobs(logits[b].tolist(), temperature, top_k, top_p))
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(got[b]))
        torch.testing.assert_close(got[b][finite], expected[finite].float(), atol=1e-5, rtol=0)


def test_mixed_rows_get_their_own_parameters():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    rows = [RowSampling(0.0, 1.0, 0, 1), RowSampling(0.8, 0.9, 4, 2)]
    t = torch.tensor([r.temperature for r in rows])
    k = torch.tensor([r.top_k for r in rows])
    p = torch.tensor([r.top_p for r in rows])
    tokens, logprobs = sample_step(logits, t, k, p, row_generators(rows, torch.device("cpu")))
    assert tokens[0] == logits[0].argmax()
    ref1 = reference_logprobs(logits[1].tolist(), 0.8, 4, 0.9)
    assert math.isfinite(ref1[tokens[1]])
    assert logprobs[1].item() == pytest.approx(ref1[tokens[1]], abs=1e-5)
    assert logprobs[0].item() == pytest.approx(
        reference_logprobs(logits[0].tolist(), 0, 0, 1)[tokens[0]], abs=1e-5
    )


def test_same_seed_same_draws_whatever_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    row = RowSampling(1.0, 1.0, 0, 1234)
    ones = torch.ones(1)

    def draws(batch_logits, index, rows):
        gens = row_generators(rows, torch.device("cpu"))
        B = len(rows)
        out = []
        for _ in range(20):
            tokens, _ = sample_step(
                batch_logits, ones.expand(B), torch.zeros(B, dtype=torch.long), ones.expand(B), gens
            )
            out.append(int(tokens[index]))
        return out

    alone = draws(logits[:1], 0, [row])
    in_batch = draws(
        torch.stack([logits[1], logits[0], logits[2]]),
        1,
        [RowSampling(1.0, 1.0, 0, 9), row, RowSampling(1.0, 1.0, 0, 7)],
    )
    assert alone == in_batch
    assert alone != draws(logits[:1], 0, [RowSampling(1.0, 1.0, 0, 1235)])


def test_first_stop_string():
    assert first_stop_string("hello world. bye", ["bye", "."]) == 11
    assert first_stop_string("hello", ["x"]) == -1
    assert first_stop_string("hello", []) == -1


@pytest.mark.parametrize("temperature", [1.401298464324817e-45, 1e-30, 9.9e-6])
def test_a_vanishing_temperature_decodes_greedily_not_nan(temperature):
    """Schemathesis sent temperature 1.4e-45 with top_p 7e-103: logits / T overflowed float32
    and the softmax gave NaN, a 503 from the gateway. Below GREEDY_BELOW a row is greedy."""
    logits = torch.tensor([[3.0, 1.0, -2.0, 2.5], [0.5, 4.0, 1.0, 3.9]])
    rows = [RowSampling(temperature, top_p=7.116007021809443e-103, top_k=0, seed=s) for s in (1, 2)]
    t = torch.tensor([r.temperature for r in rows], dtype=torch.float32)
    k = torch.tensor([r.top_k for r in rows])
    p = torch.tensor([r.top_p for r in rows], dtype=torch.float32)
    tokens, logprobs = sample_step(logits, t, k, p, row_generators(rows, torch.device("cpu")))
    assert tokens.tolist() == [0, 1]
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected) and bool(torch.isfinite(logprobs).all())
