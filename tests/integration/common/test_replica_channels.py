"""Callers reach every replica: over a list of two real reference services on the real Triton,
calls go round robin; with one replica stopped, every call still succeeds on the other (gRPC's
retry policy, within the deadline); a headless-style name (dns:///) works the same way."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient

from services.common.channels import replica_channel, replica_target
from services.genproto.rlhf.v1 import (
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
)
from tests.support.policy_stack import policy_stack
from tests.support.scoring_stacks import reference_stack

REQUEST = reference_pb2.ComputeLogprobsRequest(
    sequences=[reference_pb2.TokenSequence(prompt_token_ids=[5, 6, 7], response_token_ids=[8])]
)
SERVICE = "rlhf.v1.ReferenceService"
POLICY = "rlhf.v1.PolicyService"
SAMPLING = policy_pb2.SamplingParams(max_new_tokens=4, temperature=0.0)
GENERATE = policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(text="hello")], sampling=SAMPLING)
STREAM = policy_pb2.GenerateStreamRequest(prompt=common_pb2.Prompt(text="hello"), sampling=SAMPLING)


def served(stack) -> float:
    return (
        stack.metric("rlhf_reference_requests_total", {"method": "ComputeLogprobs", "code": "OK"})
        or 0.0
    )


def test_round_robin_then_failover_to_the_live_replica(triton_server, tiny_lm_dir):
    with (
        reference_stack(triton_server, tiny_lm_dir) as first,
        reference_stack(triton_server, tiny_lm_dir) as second,
    ):
        address = f"{first.address},localhost:{second.address.rsplit(':', 1)[1]}"
        assert replica_target(address).startswith("ipv4:127.0.0.1:")
        channel = replica_channel(address, [SERVICE])
        stub = reference_pb2_grpc.ReferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        for _ in range(8):
            stub.ComputeLogprobs(REQUEST, timeout=30)
        assert served(first) >= 2 and served(second) >= 2  # both replicas took calls
        assert served(first) + served(second) == 8

        first.service.stop(0)  # a replica goes away
        before = served(second)
        for _ in range(8):
            reply = stub.ComputeLogprobs(REQUEST, timeout=30)
            assert len(reply.results) == 1
        assert served(second) == before + 8  # every call succeeded, on the live replica
        channel.close()


def test_one_name_is_resolved_by_grpc_and_bad_lists_are_refused(triton_server, tiny_lm_dir):
    with reference_stack(triton_server, tiny_lm_dir) as stack:
        port = stack.address.rsplit(":", 1)[1]
        assert replica_target(f"localhost:{port}") == f"dns:///localhost:{port}"
        with replica_channel(f"localhost:{port}", [SERVICE]) as channel:
            reply = reference_pb2_grpc.ReferenceServiceStub(channel).ComputeLogprobs(
                REQUEST, timeout=30
            )
            assert len(reply.results[0].logprobs) == 1
    with pytest.raises(ValueError, match="host:port"):
        replica_target("127.0.0.1:1,nonsense")
    with pytest.raises(ValueError, match="mixes"):
        replica_target("127.0.0.1:1,[::1]:2")


def test_a_replica_whose_model_vanished_is_passed_over(triton_server, tiny_lm_dir):
    """The case the chaos suite saw after a Triton restart: the replica is up and says SERVING
    (its health watch has not looked yet), but its Triton has no model, so it answers
    UNAVAILABLE from the handler. Every call must still succeed on the other replica."""
    slow_watch = {"triton_health_interval_s": 600.0}
    with (
        reference_stack(triton_server, tiny_lm_dir) as first,
        reference_stack(triton_server, tiny_lm_dir, **slow_watch) as second,
    ):
        address = f"{first.address},{second.address}"
        with replica_channel(address, [SERVICE]) as channel:
            stub = reference_pb2_grpc.ReferenceServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            for _ in range(4):
                stub.ComputeLogprobs(REQUEST, timeout=30)
            client = grpcclient.InferenceServerClient(triton_server.grpc_url)
            try:
                client.unload_model(second.settings.triton_model)
            finally:
                client.close()
            with (
                grpc.insecure_channel(second.address) as direct,
                pytest.raises(grpc.RpcError) as refused,
            ):
                reference_pb2_grpc.ReferenceServiceStub(direct).ComputeLogprobs(REQUEST, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # what callers meet
            before = served(first)
            for _ in range(8):
                assert len(stub.ComputeLogprobs(REQUEST, timeout=30).results) == 1
            assert served(first) == before + 8


def test_a_policy_replica_whose_model_vanished_is_passed_over(triton_server, tiny_lm_dir, tmp_path):
    """The same for the policy, unary and streaming: the chaos suite saw UNAVAILABLE from a
    restarted replica's Generate reach the caller instead of moving to the live replica."""
    slow_watch = {"triton_health_interval_s": 600.0}
    with (
        policy_stack(triton_server, None, tiny_lm_dir, tmp_path / "a") as first,
        policy_stack(triton_server, None, tiny_lm_dir, tmp_path / "b", **slow_watch) as second,
        replica_channel(f"{first.address},{second.address}", [POLICY]) as channel,
    ):
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            client.unload_model(second.settings.triton_model)
        finally:
            client.close()
        with grpc.insecure_channel(second.address) as direct, pytest.raises(grpc.RpcError) as gone:
            policy_pb2_grpc.PolicyServiceStub(direct).Generate(GENERATE, timeout=30)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE  # what callers meet
        for _ in range(6):
            assert stub.Generate(GENERATE, timeout=60).completions[0].samples[0].token_ids
            chunks = list(stub.GenerateStream(STREAM, timeout=60))
            assert chunks[-1].finish_reason, chunks
