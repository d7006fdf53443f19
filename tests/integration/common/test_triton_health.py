"""Health follows Triton: a model service whose Triton is killed (-9) reports NOT_SERVING and
fails calls at once with UNAVAILABLE; when Triton is back it loads the model again and serves
the same answers."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.triton import TritonServer
from services.genproto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from tests.support.scoring_stacks import reference_stack

SEQUENCES = reference_pb2.ComputeLogprobsRequest(
    sequences=[reference_pb2.TokenSequence(prompt_token_ids=[5, 6, 7], response_token_ids=[8, 9])]
)


@pytest.fixture()
def own_triton(tmp_path):
    """A Triton of this test's own: the test kills it."""
    server = TritonServer(state_dir=tmp_path / "triton", model_repository=tmp_path / "repo")
    server.model_repository.mkdir()
    server.start()
    yield server
    server.stop()


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_health_and_admission_follow_triton(own_triton, tiny_lm_dir):
    with reference_stack(own_triton, tiny_lm_dir, triton_health_interval_s=0.5) as stack:
        channel = grpc.insecure_channel(stack.address)
        health = health_pb2_grpc.HealthStub(channel)
        stub = reference_pb2_grpc.ReferenceServiceStub(channel)

        def status() -> int:
            request = health_pb2.HealthCheckRequest(service="rlhf.v1.ReferenceService")
            return health.Check(request, timeout=5).status

        serving = health_pb2.HealthCheckResponse.SERVING
        assert status() == serving
        before = list(stub.ComputeLogprobs(SEQUENCES, timeout=60).results[0].logprobs)

        own_triton.daemon.kill()  # SIGKILL: no goodbye
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 15, "NOT_SERVING")
        assert stack.metric("rlhf_reference_triton_model_ready") == 0
        with pytest.raises(grpc.RpcError) as refused:
            # Within a 2 s deadline: refused at once, not left to time out on a dead model.
            stub.ComputeLogprobs(SEQUENCES, timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in refused.value.details()

        own_triton.start()  # the same ports; explicit mode, so no model until the watch loads it
        wait_for(lambda: status() == serving, 120, "SERVING again")
        assert stack.metric("rlhf_reference_triton_model_ready") == 1
        after = list(stub.ComputeLogprobs(SEQUENCES, timeout=60).results[0].logprobs)
        assert after == before
        channel.close()
