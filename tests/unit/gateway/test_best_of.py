"""Best-of-N on chat completions against stand-ins for the policy and the reward service: the
policy is asked for `best_of` samples, the n of highest reward come back best first with their
rewards, and every misuse is a 400 naming `best_of`. The real services are in
tests/integration/gateway/test_best_of.py."""

from __future__ import annotations

import grpc
import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.auth import sha256_hex
from services.gateway.best_of import RewardClient
from services.gateway.serving import ServedModels
from services.gateway.settings import GatewaySettings
from services.genproto.rlhf.v1 import reward_pb2
from tests.unit.gateway.policy_fake import FakePolicyClient, rpc_error

KEY = "unit-test-key"
USER = [{"role": "user", "content": "hi"}]
SCORES = [0.1, 0.9, -0.5, 0.4, 0.9]


class FakeRewardStub:
    def __init__(self):
        self.requests: list = []
        self.error: grpc.aio.AioRpcError | None = None

    async def Score(self, request, timeout=None):
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return reward_pb2.ScoreResponse(scores=SCORES[: len(request.pairs)], reward_model_version=7)


class FakeRewardClient:
    timeout_s = 10.0
    score = RewardClient.score

    def __init__(self):
        self.stub = FakeRewardStub()


def make_client(reward: FakeRewardClient | None) -> tuple[TestClient, FakePolicyClient]:
    settings = GatewaySettings(api_key_sha256=[sha256_hex(KEY)], rate_limit_burst=1000)
    app = create_app(settings)  # not entered: no lifespan; the services are stand-ins
    policy = FakePolicyClient()
    app.state.policy, app.state.reward = policy, reward
    app.state.models = ServedModels(policy, settings.model_aliases)
    return TestClient(app), policy


@pytest.fixture()
def reward() -> FakeRewardClient:
    return FakeRewardClient()


def post(client: TestClient, body: dict):
    return client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )


def test_the_n_highest_rewards_come_back_best_first(reward):
    client, policy = make_client(reward)
    response = post(client, {"messages": USER, "n": 2, "best_of": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    (generate,) = policy.stub.requests
    assert generate.sampling.n == 4
    (score,) = reward.stub.requests
    assert [p.response for p in score.pairs] == ["Hello!"] * 4
    assert score.pairs[0].prompt.messages.messages[0].content == "hi"
    # Scores 0.1, 0.9, -0.5, 0.4 for samples 0-3: samples 1 and 3, in that order.
    assert [(c["index"], c["response_id"]) for c in body["choices"]] == [(0, "r-0-1"), (1, "r-0-3")]
    assert [c["reward"] for c in body["choices"]] == pytest.approx([0.9, 0.4])
    assert body["id"] == "r-0-1" and body["reward_model_version"] == 7
    assert body["usage"]["completion_tokens"] == 4 * 3  # every sample drawn counts


def test_ties_keep_the_policys_order(reward):
    client, _ = make_client(reward)
    body = post(client, {"messages": USER, "best_of": 5}).json()
    assert [c["response_id"] for c in body["choices"]] == ["r-0-1"]  # 0.9 at 1 and 4: 1 first


def test_without_best_of_nothing_is_scored(reward):
    client, policy = make_client(reward)
    body = post(client, {"messages": USER, "n": 2}).json()
    assert reward.stub.requests == [] and policy.stub.requests[0].sampling.n == 2
    assert [c["reward"] for c in body["choices"]] == [None, None]
    assert body["reward_model_version"] is None


@pytest.mark.parametrize(
    ("fields", "with_reward", "why"),
    [
        ({"best_of": 2}, False, "RLHF_GATEWAY_REWARD_URL"),
        ({"best_of": 2, "n": 3}, True, "at least `n`"),
        ({"best_of": 3, "stream": True}, True, "cannot be streamed"),
        ({"best_of": 17}, True, "less than or equal to 16"),
        ({"best_of": 0}, True, "greater than or equal to 1"),
    ],
)
def test_misuse_is_a_400_naming_best_of(reward, fields, with_reward, why):
    client, policy = make_client(reward if with_reward else None)
    response = post(client, {"messages": USER, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "best_of" and why in error["message"]
    assert policy.stub.requests == [] and reward.stub.requests == []


def test_best_of_equal_to_n_may_stream(reward):
    client, policy = make_client(reward)
    response = post(client, {"messages": USER, "best_of": 2, "n": 2, "stream": True})
    assert response.status_code == 200 and policy.stub.requests[0].sampling.n == 2


def test_a_policy_refusing_the_sample_count_names_best_of(reward):
    client, policy = make_client(reward)
    policy.stub.error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.n: at most 4")
    error = post(client, {"messages": USER, "best_of": 8}).json()["error"]
    assert error["param"] == "best_of"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INVALID_ARGUMENT, 502),
    ],
)
def test_reward_failures_are_server_errors(reward, code, status):
    client, _ = make_client(reward)
    reward.stub.error = rpc_error(code, "reward model down")
    response = post(client, {"messages": USER, "best_of": 2})
    assert response.status_code == status
    assert "reward model down" in response.json()["error"]["message"]
