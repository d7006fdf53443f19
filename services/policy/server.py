"""The policy service: gRPC `rlhf.v1.PolicyService` in front of the `policy` model in Triton.

    python -m services.policy          # settings from RLHF_POLICY_*, RLHF_TRITON_*, RLHF_KAFKA_*

What runs where:
- Triton runs the model (services/policy/triton_model.py): batched generation, streaming,
  cancellation, in-place weight swaps from the shared weights folder.
- This process validates and tokenizes (validation.py), calls Triton (engine.py), logs every
  generation to Kafka before answering (servicer.py), receives and verifies weight pushes
  (updates.py, weights.py) and follows `rlhf.weights.v1` to catch up (follower.py).
SIGTERM: health goes NOT_SERVING, in-flight calls finish, then the process stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.common.grpc_server import ModelServer
from services.common.kafka import ensure_topics, make_producer
from services.common.models import load_tokenizer
from services.common.topics import GENERATIONS, TOPICS, WEIGHTS
from services.common.triton_client import write_and_load
from services.common.triton_repo import write_model
from services.policy.engine import PolicyEngine
from services.policy.follower import WeightsFollower
from services.policy.metrics import PolicyMetrics
from services.policy.servicer import PolicyServicer, add_to_server
from services.policy.settings import PolicySettings
from services.policy.triton_model import policy_spec
from services.policy.updates import WeightsUpdater
from services.policy.validation import Limits
from services.policy.weights import WeightsStore, files_specs, folder_weight_files

log = logging.getLogger(__name__)


@dataclass
class PolicyService:
    """A running policy service: its gRPC server and what it owns."""

    server: ModelServer
    servicer: PolicyServicer
    engine: PolicyEngine
    producer: object | None = None
    follower: WeightsFollower | None = None
    closed: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace_s: float | None = None) -> None:
        if self.closed:
            return
        self.closed.append(True)
        self.server.stop(grace_s)
        if self.follower is not None:
            self.follower.stop()
        if self.producer is not None:
            self.producer.flush(timeout=10)
            self.producer.close(timeout=10)
        self.engine.close()


def write_triton_model(settings: PolicySettings) -> Path:
    """Writes the Triton model into `settings.model_repository`; returns its folder."""
    spec = policy_spec(
        Path(settings.model_dir).resolve(), Path(settings.weights_root).resolve(),
        settings.initial_weights_version, settings.triton_model,
        settings.max_batch_size, settings.max_queue_delay_us, settings.device, settings.dtype,
    )
    return write_model(Path(settings.model_repository), spec)


def model_context(model_dir: Path) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 2048))


def build(settings: PolicySettings, registry: CollectorRegistry | None = None) -> PolicyService:
    """Starts everything and returns the running service (its port is `service.server.port`)."""
    store = WeightsStore(Path(settings.weights_root).resolve())
    write_and_load(settings, write_triton_model)
    engine = PolicyEngine(settings.triton, settings.triton_model)
    version, info = engine.control(settings.weights_sync_timeout_s)
    server = ModelServer("policy", settings.grpc, registry)
    metrics = PolicyMetrics(server.registry)
    metrics.weights_version.set(version)
    updater = WeightsUpdater(
        store, files_specs(folder_weight_files(settings.model_dir)), version,
        swap=lambda: engine.control(settings.weights_sync_timeout_s)[0], on_version=metrics.weights_version.set,
    )
    producer = follower = None
    if settings.log_generations or settings.follow_weights_topic:
        ensure_topics(settings.kafka, [t for t in TOPICS if t.name in (GENERATIONS, WEIGHTS)])
    if settings.log_generations:
        producer = make_producer(settings.kafka)
    limits = Limits(
        served_name=settings.served_name, max_prompts=settings.max_prompts, max_n=settings.max_n,
        max_sequences=settings.max_sequences_per_request,
        max_total_tokens=min(settings.max_total_tokens, model_context(settings.model_dir)),
        default_max_new_tokens=settings.default_max_new_tokens, max_stop_strings=settings.max_stop_strings,
    )
    servicer = PolicyServicer(
        engine, load_tokenizer(settings.model_dir), limits, updater, metrics, info,
        settings.max_queued_sequences, producer, settings.kafka_ack_timeout_s, settings.triton.timeout_s,
    )
    server.add(add_to_server, servicer, "rlhf.v1.PolicyService")
    if settings.follow_weights_topic:
        follower = WeightsFollower(settings.kafka, {settings.served_name, settings.triton_model}, updater, metrics)
        follower.start()
    server.start()
    log.info("policy serving %s version %s on port %s", settings.served_name, version, server.port)
    return PolicyService(server, servicer, engine, producer, follower)


def main() -> None:
    from services.common.logging import configure_logging

    configure_logging("policy")
    service = build(PolicySettings())
    service.server.install_signal_handlers()
    service.server.wait()
    service.stop(0)
