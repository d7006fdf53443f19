"""The reference service: gRPC `rlhf.v1.ReferenceService` in front of the Triton model `reference`.

Start here. ComputeLogprobs returns, for each (prompt tokens, response tokens), the log-prob of
every response token under the frozen reference model (the KL anchor of RL training), computed
inside Triton (services.reference.triton_model) with whatever concurrent requests the dynamic
batcher groups run as one forward pass.

    python -m services.reference     # settings from RLHF_REFERENCE_* (services.reference.settings)

With RLHF_REFERENCE_MODEL_REPOSITORY set, the service writes its Triton model there and asks
Triton (explicit model control) to load it; otherwise the deployment loads it.

Files: settings.py (configuration), logprobs.py (the math), triton_model.py (the model inside
Triton), scorer.py (logic), servicer.py (gRPC).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from services.common.grpc_server import ModelServer
from services.common.logging import configure_logging
from services.common.triton_client import write_and_load
from services.common.triton_repo import write_model
from services.genproto.rlhf.v1 import reference_pb2_grpc
from services.reference.scorer import ReferenceScorer, model_limits
from services.reference.servicer import ReferenceMetrics, ReferenceServicer
from services.reference.settings import ReferenceSettings
from services.reference.triton_model import reference_spec


def write_triton_model(settings: ReferenceSettings) -> Path:
    """Writes the Triton model into `settings.model_repository`; returns its folder."""
    spec = reference_spec(
        settings.triton_model,
        settings.model_dir,
        max_batch_size=settings.triton_max_batch_size,
        max_queue_delay_us=settings.triton_queue_delay_us,
        device=settings.device,
        dtype=settings.dtype,
    )
    return write_model(settings.model_repository, spec)


def build_server(
    settings: ReferenceSettings, registry: CollectorRegistry | None = None
) -> tuple[ModelServer, ReferenceScorer]:
    """A ModelServer with the ReferenceService added (not started), and its Triton client to close."""
    server = ModelServer("reference", settings.grpc, registry)
    scorer = ReferenceScorer(settings)
    servicer = ReferenceServicer(
        settings, model_limits(settings.model_dir), scorer, ReferenceMetrics(server.registry)
    )
    server.add(
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server,
        servicer,
        "rlhf.v1.ReferenceService",
    )
    return server, scorer


def main() -> None:
    configure_logging("reference")
    settings = ReferenceSettings()
    write_and_load(settings, write_triton_model)
    server, _ = build_server(settings)
    server.install_signal_handlers()
    server.start()
    server.wait()
