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

`tiny_ensemble_reward_model(folder, heads=3)` writes a reward-model ensemble to serve: the tiny
reward model's backbone with `heads` random heads (num_labels = heads).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from services.common.grpc_server import GrpcSettings
from services.common.model_service import ModelService
from services.common.settings import TritonSettings
from services.reference.server import ReferenceService
from services.reference.settings import ReferenceSettings
from services.reward.server import RewardService
from services.reward.settings import RewardSettings


@dataclass
class ServiceStack:
    """A running service: where to call it, and what it runs with."""

    address: str
    """host:port of the gRPC service."""
    settings: RewardSettings | ReferenceSettings
    service: RewardService | ReferenceService
    registry: CollectorRegistry
    """The service's Prometheus metrics (rlhf_reward_* / rlhf_reference_*)."""

    @property
    def follower(self):
        """The reward service's PublishedFollower, when `versions_root` is set (else None)."""
        return self.service.follower

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


def _grpc_settings() -> GrpcSettings:
    return GrpcSettings(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_s=2.0)


@contextmanager
def _running(service_type: type[ModelService], settings, triton_server) -> Iterator[ServiceStack]:
    registry = CollectorRegistry()
    service = service_type.launch(settings, registry)
    try:
        yield ServiceStack(service.address, settings, service, registry)
    finally:
        service.stop(0)
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
        grpc=overrides.pop("grpc", _grpc_settings()),
        triton=TritonSettings(url=triton_server.grpc_url),
        **overrides,
    )
    with _running(RewardService, settings, triton_server) as stack:
        yield stack


@contextmanager
def reference_stack(triton_server, model_dir: Path, **overrides) -> Iterator[ServiceStack]:
    """The reference service serving the causal LM in `model_dir`."""
    settings = ReferenceSettings(
        model_dir=Path(model_dir),
        triton_model=overrides.pop("triton_model", f"reference-{uuid.uuid4().hex[:8]}"),
        model_repository=triton_server.model_repository,
        grpc=overrides.pop("grpc", _grpc_settings()),
        triton=TritonSettings(url=triton_server.grpc_url),
        **overrides,
    )
    with _running(ReferenceService, settings, triton_server) as stack:
        yield stack


def tiny_ensemble_reward_model(out_dir: Path, heads: int, seed: int = 0) -> Path:
    """The tiny reward model (tests/support/tiny_models.py, same seed: the same backbone) with
    `heads` random output heads: an ensemble folder as `rlhf train-reward` writes one."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from tests.support.tiny_models import tiny_reward_model

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    single = tiny_reward_model(out_dir.with_name(out_dir.name + "-single"), seed=seed)
    config = AutoConfig.from_pretrained(single)
    config.num_labels = heads
    torch.manual_seed(seed + 1)
    model = AutoModelForSequenceClassification.from_pretrained(
        single, config=config, ignore_mismatched_sizes=True, use_safetensors=True
    ).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(single).save_pretrained(out_dir)
    return out_dir
