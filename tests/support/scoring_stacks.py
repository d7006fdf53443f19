"""A real reward service and a real reference service, in-process, for integration tests.

Each context manager writes its Triton model into the session Triton server's repository (under
a unique name, so several stacks and test modules never collide), loads it, starts the gRPC
service on a free port, yields a `ServiceStack`, and at exit stops the service and unloads the
model. Loading takes a while (a Triton Python stub imports torch), so use them module-scoped:

    import grpc
    import pytest
    from services.genproto.rlhf.v1 import reward_pb2, reward_pb2_grpc, common_pb2
    from tests.support.scoring_stacks import reference_stack, reward_stack

    @pytest.fixture(scope="module")
    def reward(triton_server, tiny_rm_dir):
        with reward_stack(triton_server, tiny_rm_dir) as stack:
            yield stack

    def test_scores(reward):
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(reward.address))
        pair = reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text="2+2?"), response="4")
        reply = stub.Score(reward_pb2.ScoreRequest(pairs=[pair]), timeout=30)
        assert reply.reward_model_version == 1

The reference service works the same way with `reference_stack(triton_server, tiny_lm_dir)` and
`reference_pb2_grpc.ReferenceServiceStub`. Keyword overrides go to the service's settings, e.g.
`reward_stack(triton_server, tiny_rm_dir, model_version=3, max_pairs=8)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from services.common.grpc_server import GrpcSettings, ModelServer
from services.common.settings import TritonSettings
from services.common.triton_client import write_and_load
from services.reference import server as reference_server
from services.reference.settings import ReferenceSettings
from services.reward import server as reward_server
from services.reward.settings import RewardSettings


@dataclass
class ServiceStack:
    """A running service: where to call it, and what it runs with."""

    address: str
    """host:port of the gRPC service."""
    settings: RewardSettings | ReferenceSettings
    server: ModelServer
    registry: CollectorRegistry
    """The service's Prometheus metrics (rlhf_reward_* / rlhf_reference_*)."""
    follower: object | None = None
    """The reward service's PublishedFollower, when `versions_root` is set."""

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


def _grpc_settings() -> GrpcSettings:
    return GrpcSettings(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_s=2.0)


@contextmanager
def _running(module, settings, triton_server) -> Iterator[ServiceStack]:
    write_and_load(settings, module.write_triton_model)
    registry = CollectorRegistry()
    server, scorer = module.build_server(settings, registry)
    follower = module.follow_published(settings, scorer) if hasattr(module, "follow_published") else None
    try:
        port = server.start()
        yield ServiceStack(f"127.0.0.1:{port}", settings, server, registry, follower)
    finally:
        server.stop(0)
        if follower is not None:
            follower.stop()
        scorer.close()
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            client.unload_model(settings.triton_model)
        finally:
            client.close()


@contextmanager
def reward_stack(triton_server, model_dir: Path, **overrides) -> Iterator[ServiceStack]:
    """The reward service serving `model_dir` (version `model_version`, default 1)."""
    settings = RewardSettings(
        model_dir=Path(model_dir),
        triton_model=overrides.pop("triton_model", f"reward-{uuid.uuid4().hex[:8]}"),
        model_repository=triton_server.model_repository,
        grpc=_grpc_settings(),
        triton=TritonSettings(url=triton_server.grpc_url),
        **overrides,
    )
    with _running(reward_server, settings, triton_server) as stack:
        yield stack


@contextmanager
def reference_stack(triton_server, model_dir: Path, **overrides) -> Iterator[ServiceStack]:
    """The reference service serving the causal LM in `model_dir`."""
    settings = ReferenceSettings(
        model_dir=Path(model_dir),
        triton_model=overrides.pop("triton_model", f"reference-{uuid.uuid4().hex[:8]}"),
        model_repository=triton_server.model_repository,
        grpc=_grpc_settings(),
        triton=TritonSettings(url=triton_server.grpc_url),
        **overrides,
    )
    with _running(reference_server, settings, triton_server) as stack:
        yield stack
