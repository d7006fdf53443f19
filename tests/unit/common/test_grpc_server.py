"""The shared gRPC server: health, reflection, bounded concurrency, metrics, graceful stop."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.grpc_server import GrpcSettings, ModelServer

SERVICE = "test.v1.SleepService"


def _sleep_handler(gate: threading.Event):
    def sleep(request: bytes, context) -> bytes:
        if request == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: must not be 'bad'")
        gate.wait(10)
        return b"done:" + request

    handler = grpc.unary_unary_rpc_method_handler(sleep)
    return grpc.method_handlers_generic_handler(SERVICE, {"Sleep": handler})


@pytest.fixture
def server():
    gate = threading.Event()
    settings = GrpcSettings(
        host="127.0.0.1", port=0, metrics_port=0, max_concurrent_rpcs=2, max_workers=4
    )
    srv = ModelServer("testsvc", settings, CollectorRegistry())
    srv.add(
        lambda servicer, s: s.add_generic_rpc_handlers((servicer,)), _sleep_handler(gate), SERVICE
    )
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, channel, gate
    gate.set()
    channel.close()
    srv.stop(0)


def _call(channel, payload: bytes, timeout: float = 10):
    return channel.unary_unary(f"/{SERVICE}/Sleep")(payload, timeout=timeout)


def test_health_and_reflection(server):
    _, channel, gate = server
    gate.set()
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE)
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_over_capacity_is_resource_exhausted_and_counted(server):
    srv, channel, gate = server
    results: list = []

    def slow():
        results.append(_call(channel, b"x"))

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both admitted and blocked on the gate
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, b"y")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    gate.set()
    for t in threads:
        t.join()
    assert results == [b"done:x", b"done:x"]
    with pytest.raises(grpc.RpcError) as bad:
        _call(channel, b"bad")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        srv.registry.get_sample_value(
            "rlhf_testsvc_requests_total", {"method": "Sleep", "code": "OK"}
        )
        == 2
    )
    assert (
        srv.registry.get_sample_value(
            "rlhf_testsvc_requests_total", {"method": "Sleep", "code": "INVALID_ARGUMENT"}
        )
        == 1
    )


def test_graceful_stop_finishes_in_flight_and_reports_not_serving(server):
    srv, channel, gate = server
    results: list = []
    t = threading.Thread(target=lambda: results.append(_call(channel, b"z")))
    t.start()
    time.sleep(0.3)
    stopper = threading.Thread(target=srv.stop, args=(10,))
    stopper.start()
    time.sleep(0.3)
    assert srv.health._server_status[""] == health_pb2.HealthCheckResponse.NOT_SERVING
    gate.set()
    t.join()
    stopper.join()
    assert results == [b"done:z"]
