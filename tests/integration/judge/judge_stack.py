"""Runs a real judge service for tests: in model mode its `judge` model is written into the
session Triton server and loaded; in rules mode (an `annotator`) nothing touches Triton. The gRPC
server runs in-process on a free port.

    with judge_stack(triton_server, tiny_lm_dir) as judge:            # the model judge
        stub = judge_pb2_grpc.JudgeServiceStub(grpc.insecure_channel(judge.address))
    with judge_stack(None, annotator="services.common.annotator_rules:polite",
                     kafka=kafka_settings) as judge: ...              # the rule-based judge
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from services.common.grpc_server import GrpcSettings
from services.common.settings import TritonSettings
from services.genproto.rlhf.v1 import judge_pb2_grpc
from services.judge.server import JudgeService
from services.judge.settings import JudgeSettings


@dataclass
class JudgeStack:
    service: JudgeService
    settings: JudgeSettings
    registry: CollectorRegistry

    @property
    def address(self) -> str:
        return self.service.address

    def stub(self) -> judge_pb2_grpc.JudgeServiceStub:
        return judge_pb2_grpc.JudgeServiceStub(grpc.insecure_channel(self.address))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


@contextmanager
def judge_stack(triton_server, model_dir: Path | None = None, **overrides) -> Iterator[JudgeStack]:
    triton_model = overrides.pop("triton_model", f"judge-{uuid.uuid4().hex[:8]}")
    settings = JudgeSettings(
        model_dir=Path(model_dir) if model_dir else Path("."),
        triton_model=triton_model,
        model_repository=triton_server.model_repository if triton_server else None,
        grpc=GrpcSettings(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_s=2.0),
        triton=TritonSettings(url=triton_server.grpc_url) if triton_server else TritonSettings(),
        **overrides,
    )
    registry = CollectorRegistry()
    service = JudgeService.launch(settings, registry)
    try:
        yield JudgeStack(service, settings, registry)
    finally:
        service.stop(0)
        if triton_server is not None and settings.mode == "model":
            client = grpcclient.InferenceServerClient(triton_server.grpc_url)
            try:
                client.unload_model(triton_model)
            finally:
                client.close()
