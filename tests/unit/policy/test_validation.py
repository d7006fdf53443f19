"""SamplingParams checks: the proto's documented defaults are what the server does (n 0 means
1, top_p 0 means 1, max_new_tokens 0 means the server's default), and the new fields are bounded
with errors that name them."""

from __future__ import annotations

import math

import pytest

from services.genproto.rlhf.v1 import policy_pb2
from services.policy.validation import InvalidArgument, Limits, check_sampling

LIMITS = Limits(
    served_name="tiny",
    max_prompts=4,
    max_n=4,
    max_sequences=8,
    max_total_tokens=512,
    default_max_new_tokens=32,
    max_stop_strings=2,
    vocab_size=100,
)


def test_documented_defaults():
    plan = check_sampling(policy_pb2.SamplingParams(), prompts=1, limits=LIMITS)
    assert (plan.n, plan.max_new_tokens, plan.top_p, plan.logit_bias) == (1, 32, 1.0, {})
    explicit = policy_pb2.SamplingParams(n=3, max_new_tokens=7, top_p=0.5, logit_bias={99: -100})
    plan = check_sampling(explicit, prompts=2, limits=LIMITS)
    assert (plan.n, plan.max_new_tokens, plan.top_p, plan.logit_bias) == (3, 7, 0.5, {99: -100.0})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"n": 5}, "sampling.n"),
        ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
        ({"frequency_penalty": -2.01}, "sampling.frequency_penalty"),
        ({"frequency_penalty": math.nan}, "sampling.frequency_penalty"),
        ({"top_logprobs": 21}, "sampling.top_logprobs"),
        ({"logit_bias": {100: 1.0}}, "sampling.logit_bias"),  # not in the vocabulary
        ({"logit_bias": {3: 100.5}}, "sampling.logit_bias"),
        ({"logit_bias": {3: math.inf}}, "sampling.logit_bias"),
        ({"temperature": -1}, "sampling.temperature"),
        ({"top_p": 1.5}, "sampling.top_p"),
    ],
)
def test_out_of_range_is_refused_naming_the_field(params, field):
    with pytest.raises(InvalidArgument) as err:
        check_sampling(policy_pb2.SamplingParams(**params), prompts=1, limits=LIMITS)
    assert err.value.field == field


def test_bounds_are_inclusive():
    params = policy_pb2.SamplingParams(
        presence_penalty=2.0, frequency_penalty=-2.0, top_logprobs=20, logit_bias={0: -100, 99: 100}
    )
    assert check_sampling(params, prompts=1, limits=LIMITS).logit_bias == {0: -100.0, 99: 100.0}
