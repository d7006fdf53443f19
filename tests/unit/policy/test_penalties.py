"""Logit bias and presence/frequency penalties (OpenAI's formula) and the top alternatives of a
position, against references written out by hand: a Python loop over the vocabulary for the
formula, and a decoding loop without KV cache for the batched generation."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.policy.generation import Row, generate_rows
from services.policy.sampling import (
    LogitAdjustments,
    RowSampling,
    adjusted_logits,
    top_alternatives,
)


def reference_adjusted(
    logits: list[float], generated: list[int], presence: float, frequency: float, bias: dict
) -> list[float]:
    """One row by hand: logit[t] + bias[t] - presence * (count[t] > 0) - frequency * count[t]."""
    out = []
    for t, x in enumerate(logits):
        count = generated.count(t)
        out.append(x + bias.get(t, 0.0) - presence * (count > 0) - frequency * count)
    return out


def test_adjusted_logits_equal_the_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g)
    generated = [[1, 1, 4, 7, 1], [], [11, 0, 0]]
    presence, frequency = [0.5, 1.0, -0.7], [0.25, 2.0, 1.5]
    bias = [{3: 100.0, 1: -2.5}, {}, {0: -100.0, 5: 0.5}]
    counts = torch.zeros(3, 12)
    for i, tokens in enumerate(generated):
        for t in tokens:
            counts[i, t] += 1
    dense_bias = torch.zeros(3, 12)
    for i, b in enumerate(bias):
        for t, v in b.items():
            dense_bias[i, t] = v
    got = adjusted_logits(
        logits, counts, torch.tensor(presence), torch.tensor(frequency), dense_bias
    )
    for i in range(3):
        expected = reference_adjusted(
            logits[i].tolist(), generated[i], presence[i], frequency[i], bias[i]
        )
        assert got[i].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)  # float32


def test_adjustments_count_only_the_rows_that_generated():
    rows = [RowSampling(0.0, 1.0, 0, 0, presence_penalty=1.0), RowSampling(0.0, 1.0, 0, 0)]
    adj = LogitAdjustments(rows, vocab=5, device=torch.device("cpu"))
    adj.record(torch.tensor([2, 3]), [0, 1])
    adj.record(torch.tensor([2, 4]), [0])  # row 1 already finished: its token is not counted
    assert adj.counts.tolist() == [[0, 0, 2, 0, 0], [0, 0, 0, 1, 0]]
    logits = torch.zeros(2, 5)
    assert adj.apply(logits)[0].tolist() == [0, 0, -1, 0, 0]  # presence: once, not per count
    assert adj.apply(logits)[1].tolist() == [0, 0, 0, 0, 0]  # row 1 has no penalty


def test_no_adjustment_asked_leaves_the_logits_untouched():
    rows = [RowSampling(0.7, 1.0, 0, 0), RowSampling(0.0, 1.0, 0, 1)]
    adj = LogitAdjustments(rows, vocab=7, device=torch.device("cpu"))
    assert adj.counts is None and adj.bias is None
    logits = torch.randn(2, 7)
    assert adj.apply(logits) is logits


def test_top_alternatives_are_the_best_finite_tokens_best_first():
    logprobs = torch.log_softmax(torch.tensor([[0.1, 2.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), -1)
    logprobs[1, 2:] = float("-inf")  # filtered out by top-k/top-p
    (ids0, lp0), (ids1, lp1), (ids2, lp2) = top_alternatives(
        torch.cat([logprobs, logprobs[:1]]), [3, 4, 0]
    )
    assert ids0 == [1, 3, 0] and lp0 == pytest.approx(logprobs[0, [1, 3, 0]].tolist())
    assert sorted(ids1) == [0, 1] and all(math.isfinite(v) for v in lp1)  # fewer than asked
    assert (ids2, lp2) == ([], [])


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    torch.set_num_threads(1)
    return load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32), load_tokenizer(
        tiny_lm_dir
    )


@torch.inference_mode()
def reference_decode(model, prompt: list[int], steps: int, s: RowSampling) -> list[int]:
    """Greedy decoding with the whole sequence re-run every step (no cache, no batch) and the
    adjustments written out per token."""
    tokens: list[int] = []
    for _ in range(steps):
        logits = model(torch.tensor([prompt + tokens])).logits[0, -1].tolist()
        adjusted = reference_adjusted(
            logits, tokens, s.presence_penalty, s.frequency_penalty, dict(s.logit_bias)
        )
        tokens.append(max(range(len(adjusted)), key=adjusted.__getitem__))
    return tokens


def test_batched_generation_with_penalties_equals_the_reference_loop(lm):
    model, tok = lm
    prompts = [tok("The cat sat on")["input_ids"], tok("Hello there, friend")["input_ids"]]
    settings = [
        RowSampling(0.0, 1.0, 0, 0, presence_penalty=0.6, frequency_penalty=0.3),
        RowSampling(0.0, 1.0, 0, 0, frequency_penalty=-0.4, logit_bias={11: 0.3, 42: -5.0}),
        RowSampling(0.0, 1.0, 0, 0),
    ]
    rows = [Row(prompts[i % 2], 10, s) for i, s in enumerate(settings)]
    generate_rows(model, rows, tok.pad_token_id, set(), lambda t: tok.decode(t))
    for row, s in zip(rows, settings):
        assert row.tokens == reference_decode(model, row.prompt_ids, 10, s)


def test_penalties_change_greedy_output_as_they_must(lm):
    """The tiny model's logits lie within a span of 2, so presence 2 forbids any repeat and
    frequency -2 makes the first token win every step after."""
    model, tok = lm
    ids = tok("The cat sat on")["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert float(logits.max() - logits.min()) < 2  # the premise of the two facts below
    plain, distinct, repeat, forced, zero_bias = (
        Row(ids, 12, RowSampling(0.0, 1.0, 0, 0)),
        Row(ids, 12, RowSampling(0.0, 1.0, 0, 0, presence_penalty=2.0)),
        Row(ids, 12, RowSampling(0.0, 1.0, 0, 0, frequency_penalty=-2.0)),
        Row(ids, 12, RowSampling(0.0, 1.0, 0, 0, logit_bias={1234: 100.0})),
        Row(ids, 12, RowSampling(0.0, 1.0, 0, 0, logit_bias={0: 0.0})),
    )
    rows = [plain, distinct, repeat, forced, zero_bias]
    generate_rows(model, rows, tok.pad_token_id, set(), lambda t: tok.decode(t))
    assert len(set(plain.tokens)) < 12  # unpenalised greedy repeats itself
    assert len(set(distinct.tokens)) == 12
    assert repeat.tokens == [repeat.tokens[0]] * 12
    assert forced.tokens == [1234] * 12
    assert zero_bias.tokens == plain.tokens  # rows of one batch do not leak into each other
    first = plain.tokens[0]
    without = Row(ids, 12, RowSampling(0.0, 1.0, 0, 0, logit_bias={first: -100.0}))
    generate_rows(model, [without], tok.pad_token_id, set(), lambda t: tok.decode(t))
    assert first not in without.tokens


def test_logprobs_and_alternatives_come_from_the_adjusted_distribution(lm):
    model, tok = lm
    ids = tok("Hello")["input_ids"]
    s = RowSampling(0.8, 0.9, 30, 7, presence_penalty=1.0, logit_bias={5: 1.0}, top_logprobs=5)
    row = Row(ids, 6, s)
    generate_rows(model, [row], tok.pad_token_id, set(), lambda t: tok.decode(t))
    with torch.inference_mode():
        all_logits = model(torch.tensor([ids + row.tokens])).logits[0]
    for t, token in enumerate(row.tokens):
        logits = all_logits[len(ids) + t - 1].tolist()
        adjusted = torch.tensor(reference_adjusted(logits, row.tokens[:t], 1.0, 0.0, {5: 1.0}))
        scaled = adjusted / 0.8
        keep = scaled.argsort(descending=True)[:30]  # top-k
        probs = torch.softmax(scaled[keep], -1)
        n = int((probs.cumsum(-1) - probs < 0.9).sum())  # top-p: smallest prefix reaching 0.9
        kept = keep[:n]
        expected = torch.full_like(scaled, float("-inf"))
        expected[kept] = torch.log_softmax(scaled[kept], -1)
        assert row.logprobs[t] == pytest.approx(expected[token].item(), abs=1e-5)
        best = expected.topk(5)
        finite = [(i, v) for i, v in zip(best.indices.tolist(), best.values.tolist()) if v > -1e30]
        assert row.top_ids[t] == [i for i, _ in finite]
        assert row.top_logprobs[t] == pytest.approx([v for _, v in finite], abs=1e-5)
        if token in row.top_ids[t]:
            assert row.top_logprobs[t][row.top_ids[t].index(token)] == row.logprobs[t]
