"""Both orders of every pair go to the judge in one batch and come back combined; the rule judge
and the two-letter normalisation; the Triton model's batched letter log-probabilities equal an
unpadded forward pass of the same model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.judge.judges import (
    Pair,
    RuleJudge,
    compare,
    letter_token_ids,
    two_letter_probability,
)
from services.judge.rubric import Rubric
from services.judge.settings import JudgeSettings
from services.judge.triton_model import encode_conversation, letter_logprobs

RULE = "tests.integration.judge.rules:longer"


class RecordingJudge:
    """Returns a fixed P(first better) per (first, second) and records every row asked."""

    name, mode, rubric = "recording", "rules", Rubric("t", "t")

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table
        self.asked: list[tuple[str, str, str]] = []

    def first_better(self, questions, firsts, seconds, timeout_s):
        self.asked += list(zip(questions, firsts, seconds))
        return np.array([self.table[(f, s)] for f, s in zip(firsts, seconds)])

    def close(self):
        pass


def test_compare_asks_both_orders_and_combines_them():
    judge = RecordingJudge({("x", "y"): 0.9, ("y", "x"): 0.3, ("u", "v"): 0.6, ("v", "u"): 0.6})
    verdicts = compare(judge, [Pair("q1", "x", "y"), Pair("q2", "u", "v")], timeout_s=1)
    assert judge.asked == [("q1", "x", "y"), ("q2", "u", "v"), ("q1", "y", "x"), ("q2", "v", "u")]
    first, second = verdicts
    assert (first.p_a_first, first.p_b_first) == (0.9, 0.3)
    assert first.p_a_better == pytest.approx(0.8)
    assert first.confidence == pytest.approx(0.6)
    # The same preference for the first position in both orders is a tie.
    assert second.p_a_better == pytest.approx(0.5) and second.confidence == pytest.approx(0.0)


def test_rule_judge_prefers_by_score_in_both_orders():
    judge = RuleJudge(JudgeSettings(annotator=RULE))
    assert judge.name == RULE and judge.rubric.version == "rules"
    pairs = [Pair("q", "long answer", "short"), Pair("q", "ab", "abcd"), Pair("q", "same", "SAME")]
    verdicts = compare(judge, pairs, timeout_s=1)
    assert [v.p_a_better for v in verdicts] == [1.0, 0.0, 0.5]
    assert [v.confidence for v in verdicts] == [1.0, 1.0, 0.0]
    assert [(v.p_a_first, v.p_b_first) for v in verdicts] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]


def test_two_letter_probability_is_the_normalised_ratio():
    a, b = np.log([0.02, 0.3]), np.log([0.06, 0.1])
    assert two_letter_probability(a, b) == pytest.approx([0.25, 0.75])
    # Both letters improbable under the full softmax: the ratio is still exact.
    assert two_letter_probability(np.array([-1000.0]), np.array([-1001.0]))[0] == pytest.approx(
        1 / (1 + math.exp(-1))
    )


def test_batched_letter_logprobs_equal_unpadded_forward(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32).eval()
    a, b = letter_token_ids(tokenizer)
    assert tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"
    conversations = [
        [{"role": "user", "content": "Short?"}],
        [{"role": "system", "content": "Judge."}, {"role": "user", "content": "A longer one " * 9}],
    ]
    encoded = [encode_conversation(tokenizer, c) for c in conversations]
    assert len(encoded[0]) != len(encoded[1])  # the batch is padded
    batched = letter_logprobs(model, encoded, (a, b), tokenizer.pad_token_id)
    assert batched.shape == (2, 2)
    for row, ids in zip(batched, encoded):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        assert row == pytest.approx([float(logprobs[a]), float(logprobs[b])], abs=1e-5)


def test_letters_must_be_single_tokens():
    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="splits 'A' into 2 tokens"):
        letter_token_ids(Splitting())
