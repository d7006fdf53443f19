"""The reward service scoring by a rule (RLHF_REWARD_ANNOTATOR=module:function): a real gRPC
service with no model and no Triton, whose Score equals the rule's own numbers, for verifiable
rewards and for benchmarks that must use the same in-process rule as another library."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.annotator import load_annotator
from services.common.grpc_server import GrpcSettings
from services.genproto.rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.reward.server import RewardService
from services.reward.settings import RewardSettings

RULE = "tests.integration.judge.rules:longer"


def settings(**overrides) -> RewardSettings:
    return RewardSettings(
        annotator=RULE,
        model_version=4,
        triton_health_interval_s=0.05,
        grpc=GrpcSettings(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_s=1.0),
        **overrides,
    )


@pytest.fixture(scope="module")
def service():
    service = RewardService.launch(settings(), CollectorRegistry())
    yield service
    service.stop(0)


def test_scores_are_the_rules_and_name_the_configured_version(service):
    rule = load_annotator(RULE)
    questions, answers = ["q1", "q2", "q3"], ["a", "a much longer answer", ""]
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(service.address))
    reply = stub.Score(
        reward_pb2.ScoreRequest(
            pairs=[
                reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text=q), response=a)
                for q, a in zip(questions, answers)
            ]
        ),
        timeout=10,
    )
    assert list(reply.scores) == [rule.score(q, a) for q, a in zip(questions, answers)]
    assert list(reply.spreads) == [0.0, 0.0, 0.0] and reply.ensemble_size == 1
    assert reply.reward_model_version == 4


def test_it_stays_serving_without_triton_and_refuses_reloads(service):
    time.sleep(2.0)  # a Triton watch would have found no model by now
    with grpc.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    result = service.scorer.reload(5, "/nowhere", {"model.safetensors": "0" * 64})
    assert (result.accepted, result.version) == (False, 4) and "no model" in result.reason


def test_bad_input_is_still_invalid_argument(service):
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(service.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(pairs=[]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_rule_with_versions_to_follow_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a rule reward has no model versions"):
        RewardService.launch(settings(versions_root=tmp_path), CollectorRegistry())
