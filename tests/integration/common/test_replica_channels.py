"""Callers reach every replica: over a list of two real reference services on the real Triton,
calls go round robin; with one replica stopped, every call still succeeds on the other (gRPC's
retry policy, within the deadline); a headless-style name (dns:///) works the same way."""

from __future__ import annotations

import grpc
import pytest

from services.common.channels import replica_channel, replica_target
from services.genproto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from tests.support.scoring_stacks import reference_stack

REQUEST = reference_pb2.ComputeLogprobsRequest(
    sequences=[reference_pb2.TokenSequence(prompt_token_ids=[5, 6, 7], response_token_ids=[8])]
)
SERVICE = "rlhf.v1.ReferenceService"


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
