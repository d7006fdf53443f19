"""Best-of-N through the official `openai` client (`extra_body={"best_of": 4}`) against the real
gateway, the real policy and the real reward service on the real Triton server: the answers are
the n of highest reward among the best_of samples, as the reward service scores them directly.

The policy samples with a seed, so `n=4, seed=S` shows exactly the four samples that
`best_of=4, seed=S` ranks (the same GenerateRequest reaches the policy)."""

from __future__ import annotations

import grpc
import openai
import pytest

from services.genproto.rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from tests.integration.gateway.gateway_process import running_gateway
from tests.support.scoring_stacks import reward_stack

MESSAGES = [{"role": "user", "content": "Tell me something kind"}]
SAMPLING = {"model": "policy", "max_tokens": 8, "temperature": 1.0, "seed": 11}


@pytest.fixture(scope="module")
def reward(triton_server, tiny_rm_dir):
    with reward_stack(triton_server, tiny_rm_dir, model_version=5) as stack:
        yield stack


@pytest.fixture(scope="module")
def best_of_gateway(policy, reward, kafka_settings, run_dir):
    with running_gateway(
        kafka_settings,
        run_dir / "gateway",
        policy_url=policy.address,
        reward_url=reward.address,
        rate_limit_burst=10_000,
        max_new_tokens_limit=16,
    ) as gw:
        yield gw


def _client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.api_key, timeout=120, max_retries=0)


def _direct_scores(reward, texts: list[str]) -> list[float]:
    prompt = common_pb2.Prompt(
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in MESSAGES])
    )
    with grpc.insecure_channel(reward.address) as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).Score(
            reward_pb2.ScoreRequest(
                pairs=[reward_pb2.ScoredPair(prompt=prompt, response=t) for t in texts]
            ),
            timeout=60,
        )
    return list(reply.scores)


def test_best_of_returns_the_highest_rewards_of_the_samples(best_of_gateway, reward):
    client = _client(best_of_gateway)
    every = client.chat.completions.create(messages=MESSAGES, n=4, **SAMPLING)
    texts = [c.message.content for c in every.choices]
    assert len(set(texts)) > 1, f"the samples are all alike, the ranking proves nothing: {texts}"
    scores = _direct_scores(reward, texts)
    ranked = sorted(range(4), key=lambda i: -scores[i])

    best = client.chat.completions.create(
        messages=MESSAGES, n=1, extra_body={"best_of": 4}, **SAMPLING
    )
    (choice,) = best.choices
    assert choice.message.content == texts[ranked[0]]
    assert choice.reward == pytest.approx(max(scores), abs=1e-4)
    assert choice.response_id == best.id
    assert best.reward_model_version == 5
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all four were drawn

    top_two = client.chat.completions.create(
        messages=MESSAGES, n=2, extra_body={"best_of": 4}, **SAMPLING
    )
    assert [c.message.content for c in top_two.choices] == [texts[i] for i in ranked[:2]]
    assert [c.reward for c in top_two.choices] == pytest.approx(
        [scores[i] for i in ranked[:2]], abs=1e-4
    )


def test_streaming_best_of_above_n_is_refused(best_of_gateway):
    with pytest.raises(openai.BadRequestError) as refused:
        _client(best_of_gateway).chat.completions.create(
            messages=MESSAGES, stream=True, extra_body={"best_of": 2}, **SAMPLING
        )
    assert refused.value.body["param"] == "best_of"


def test_best_of_without_a_reward_service_is_refused(chat_gateway):
    with pytest.raises(openai.BadRequestError) as refused:
        _client(chat_gateway).chat.completions.create(
            messages=MESSAGES, extra_body={"best_of": 2}, **SAMPLING
        )
    assert refused.value.body["param"] == "best_of"
    assert "RLHF_GATEWAY_REWARD_URL" in refused.value.body["message"]
