"""The OpenAI-style sampling fields through the real gRPC server and the real Triton model,
against the same model in process: logit bias and presence/frequency penalties in the
log-probs of the distribution actually sampled from, the top alternatives of each position, the
same tokens streamed or unary, and the proto's documented defaults (n 0 means 1)."""

from __future__ import annotations

import pytest
import torch

from services.genproto.rlhf.v1 import common_pb2, policy_pb2
from tests.integration.policy.test_generation import PROMPTS, generate, reference_logprobs, sampling


def adjusted(logits: torch.Tensor, generated: list[int], s: dict) -> torch.Tensor:
    """OpenAI's formula for one position, by hand over the tokens generated before it."""
    out = logits.clone()
    for token, bias in s.get("logit_bias", {}).items():
        out[token] += bias
    for token in set(generated):
        count = generated.count(token)
        out[token] -= s.get("presence_penalty", 0.0) + s.get("frequency_penalty", 0.0) * count
    return out


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0, "presence_penalty": 1.5, "frequency_penalty": 0.5},
        {"temperature": 0.9, "top_p": 0.9, "frequency_penalty": -1.0, "logit_bias": {42: 1.0}},
        {"temperature": 0.7, "top_k": 40, "presence_penalty": -0.5, "logit_bias": {7: -3.0}},
    ],
)
def test_logprobs_under_bias_and_penalties_equal_in_process(stub, reference, params):
    model, _ = reference
    response = generate(stub, PROMPTS, n=2, seed=5, has_seed=True, top_logprobs=3, **params)
    for completion in response.completions:
        start = len(completion.prompt_token_ids)
        for sample in completion.samples:
            ids = list(completion.prompt_token_ids) + list(sample.token_ids)
            with torch.inference_mode():
                logits = model(torch.tensor([ids])).logits[0]  # (T, V)
            tokens = list(sample.token_ids)
            assert len(sample.token_logprobs) == len(tokens)
            for t, (token, served) in enumerate(zip(tokens, sample.logprobs)):
                dist = reference_logprobs(
                    adjusted(logits[start + t - 1], tokens[:t], params),
                    params["temperature"],
                    params.get("top_k", 0),
                    params.get("top_p", 1.0),
                )
                assert abs(served - dist[token].item()) < 1e-4, (t, served)
                position = sample.token_logprobs[t]
                assert (position.sampled.token_id, position.sampled.logprob) == (token, served)
                best = [(a.token_id, a.logprob) for a in position.top]
                assert [lp for _, lp in best] == sorted((lp for _, lp in best), reverse=True)
                for a, lp in best:
                    assert abs(lp - dist[a].item()) < 1e-4
                assert len(best) == min(3, int(torch.isfinite(dist).sum()))
                if token in dict(best):
                    assert dict(best)[token] == served  # the very same number


def test_bias_bans_and_forces_tokens(stub, reference):
    _, tok = reference
    greedy = generate(stub, PROMPTS[:1], temperature=0.0, max_new_tokens=6)
    first = greedy.completions[0].samples[0].token_ids[0]
    banned = generate(
        stub, PROMPTS[:1], temperature=0.0, max_new_tokens=6, logit_bias={first: -100}
    )
    assert first not in banned.completions[0].samples[0].token_ids
    forced_id = tok(" yes", add_special_tokens=False)["input_ids"][0]
    forced = generate(
        stub, PROMPTS[:1], temperature=0.9, max_new_tokens=6, logit_bias={forced_id: 100}
    )
    assert list(forced.completions[0].samples[0].token_ids) == [forced_id] * 6


def test_stream_equals_unary_with_penalties_and_alternatives(stub, reference):
    _, tok = reference
    kw = {
        "n": 2,
        "temperature": 1.0,
        "seed": 9,
        "has_seed": True,
        "max_new_tokens": 8,
        "presence_penalty": 1.0,
        "frequency_penalty": 0.5,
        "logit_bias": {100: 2.0},
        "top_logprobs": 2,
    }
    unary = generate(stub, PROMPTS[:1], **kw).completions[0]
    streamed = {0: [], 1: []}
    positions = {0: [], 1: []}
    for chunk in stub.GenerateStream(
        policy_pb2.GenerateStreamRequest(
            prompt=common_pb2.Prompt(text=PROMPTS[0]), sampling=sampling(**kw)
        ),
        timeout=60,
    ):
        assert chunk.prompt_tokens == len(unary.prompt_token_ids)
        streamed[chunk.sample_index] += list(chunk.token_ids)
        positions[chunk.sample_index] += list(chunk.token_logprobs)
    for j, sample in enumerate(unary.samples):
        assert streamed[j] == list(sample.token_ids)
        assert positions[j] == list(sample.token_logprobs)
        for p in sample.token_logprobs:
            assert p.sampled.text == tok.decode([p.sampled.token_id])


def test_streamed_text_with_a_stop_string_equals_the_unary_text(stub):
    free = generate(stub, PROMPTS[:1], temperature=0.0, max_new_tokens=12).completions[0].samples[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    kw = {"temperature": 0.0, "max_new_tokens": 12, "stop": [stop]}
    unary = generate(stub, PROMPTS[:1], **kw).completions[0].samples[0]
    text = "".join(
        chunk.text_delta
        for chunk in stub.GenerateStream(
            policy_pb2.GenerateStreamRequest(
                prompt=common_pb2.Prompt(text=PROMPTS[0]), sampling=sampling(**kw)
            ),
            timeout=60,
        )
    )
    assert unary.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert text == unary.text and stop not in text


def test_documented_defaults_n_zero_is_one_sample(stub):
    """policy.proto: `n` 0 means 1, `top_p` 0 means 1, `max_new_tokens` 0 the server's default."""
    response = stub.Generate(
        policy_pb2.GenerateRequest(
            prompts=[common_pb2.Prompt(text="Hello")],
            sampling=policy_pb2.SamplingParams(max_new_tokens=3),
        ),
        timeout=60,
    )
    (sample,) = response.completions[0].samples
    assert len(sample.token_ids) == 3 and list(sample.token_logprobs) == []
    default = policy_pb2.SamplingParams()
    reply = stub.Generate(
        policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(text="Hello")], sampling=default),
        timeout=60,
    )
    assert len(reply.completions[0].samples) == 1
    assert 1 <= len(reply.completions[0].samples[0].token_ids) <= 64  # the server's default
