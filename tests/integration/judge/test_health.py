"""A judge without a model of its own (a rule, or a PolicyService's model) stays SERVING whatever
Triton does: its health must not follow a Triton model it never loaded, or a readiness probe
(the chart's judge in policy mode, `make up`'s) would take it out of service."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.genproto.rlhf.v1 import common_pb2, judge_pb2
from tests.integration.judge.judge_stack import judge_stack

RULE = "tests.integration.judge.rules:longer"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_a_rule_judge_stays_serving_with_no_triton_model():
    with judge_stack(None, annotator=RULE, triton_health_interval_s=0.05) as judge:
        time.sleep(3.0)  # a running watch would have asked Triton (1 s timeout) and failed
        assert health(judge.address) == health_pb2.HealthCheckResponse.SERVING
        verdict = (
            judge.stub()
            .Compare(
                judge_pb2.CompareRequest(
                    pairs=[
                        judge_pb2.JudgedPair(
                            prompt=common_pb2.Prompt(text="q"), answer_a="long answer", answer_b="a"
                        )
                    ]
                ),
                timeout=10,
            )
            .verdicts[0]
        )
        assert verdict.p_a_better == 1.0
