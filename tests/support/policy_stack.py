"""Runs a real policy service for tests: the `policy` model written into the session Triton
server and loaded, and the gRPC server in-process on a free port.

    from tests.support.policy_stack import policy_stack

    @pytest.fixture(scope="module")
    def policy(triton_server, kafka_settings, tiny_lm_dir, tmp_path_factory):
        with policy_stack(triton_server, kafka_settings, tiny_lm_dir, tmp_path_factory.mktemp("policy")) as stack:
            yield stack

    def test_something(policy):
        channel = grpc.insecure_channel(policy.address)
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        ...                                  # policy.weights_version: the version served now
                                             # policy.model_name: what GetModelInfo reports

The Triton model name is unique per stack (`policy-<n>`) unless `triton_model` is given, so
several stacks (and other helpers' tests) can share the session Triton server. Generations go
to the real `rlhf.generations.v1`; pass `log_generations=False` to skip Kafka for them.
Extra `PolicySettings` fields go in `**overrides`; gRPC ones in `grpc_overrides`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.common.grpc_server import GrpcSettings
from services.common.settings import KafkaSettings, TritonSettings
from services.common.triton_client import connect
from services.policy.server import PolicyService
from services.policy.settings import PolicySettings

_ids = itertools.count()


@dataclass
class PolicyStack:
    service: PolicyService
    settings: PolicySettings

    @property
    def address(self) -> str:
        """host:port of the gRPC PolicyService."""
        return self.service.address

    @property
    def weights_version(self) -> int:
        return self.service.servicer.updater.version

    @property
    def model_name(self) -> str:
        return self.settings.served_name

    @property
    def registry(self):
        """The service's Prometheus registry (read metrics with registry.get_sample_value)."""
        return self.service.server.registry


@contextmanager
def policy_stack(
    triton_server,
    kafka_settings: KafkaSettings | None,
    model_dir: Path,
    work_dir: Path,
    triton_model: str | None = None,
    grpc_overrides: dict | None = None,
    **overrides,
) -> Iterator[PolicyStack]:
    name = triton_model or f"policy-{os.getpid()}-{next(_ids)}"
    work_dir = Path(work_dir)
    log_generations = kafka_settings is not None and overrides.pop("log_generations", True)
    follow_weights_topic = kafka_settings is not None and overrides.pop(
        "follow_weights_topic", True
    )
    settings = PolicySettings(
        model_dir=Path(model_dir),
        triton_model=name,
        weights_root=work_dir / "weights",
        model_repository=triton_server.model_repository,
        grpc=GrpcSettings(
            **{
                "host": "127.0.0.1",
                "port": 0,
                "metrics_port": 0,
                "shutdown_grace_s": 2.0,
                **(grpc_overrides or {}),
            }
        ),
        kafka=kafka_settings or KafkaSettings(),
        triton=TritonSettings(url=triton_server.grpc_url),
        log_generations=log_generations,
        follow_weights_topic=follow_weights_topic,
        **overrides,
    )
    service = PolicyService.launch(settings)
    try:
        yield PolicyStack(service, settings)
    finally:
        service.stop(grace_s=2.0)
        client = connect(settings.triton)
        try:
            client.unload_model(name)
        finally:
            client.close()
