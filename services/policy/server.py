"""The policy service: gRPC `rlhf.v1.PolicyService` in front of the `policy` model in Triton.

    python -m services.policy          # settings from RLHF_POLICY_*, RLHF_TRITON_*, RLHF_KAFKA_*

What runs where:
- Triton runs the model (services/policy/triton_model.py): continuous batching (services/
  policy/scheduler.py), streaming, cancellation, in-place weight swaps from the weights folder.
- This process validates and tokenizes (validation.py), calls Triton (engine.py), logs every
  generation to Kafka before answering (servicer.py), receives and verifies weight pushes
  (updates.py, weights.py) and follows `rlhf.weights.v1` to catch up (follower.py).
The lifecycle (write and load the Triton model, serve, drain on SIGTERM) is the one every model
service shares: services/common/model_service.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.common.kafka import ensure_topics, make_producer
from services.common.model_service import ModelService, python_model_spec
from services.common.models import load_tokenizer
from services.common.side_channel import SideChannelListener
from services.common.topics import GENERATIONS, TOPICS, WEIGHTS
from services.common.triton_repo import PythonModelSpec
from services.policy.engine import PolicyEngine
from services.policy.follower import WeightsFollower
from services.policy.metrics import PolicyMetrics
from services.policy.servicer import Admission, PolicyServicer, add_to_server
from services.policy.settings import PolicySettings
from services.policy.triton_model import INPUTS, OUTPUTS
from services.policy.updates import WeightsUpdater
from services.policy.validation import Limits
from services.policy.weights import WeightsStore, files_specs, folder_weight_files

log = logging.getLogger(__name__)


def model_limits(model_dir: Path) -> tuple[int, int | None]:
    """(context length, vocabulary size of the LM head) from the model's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    vocab = getattr(config, "vocab_size", None)
    return int(getattr(config, "max_position_embeddings", 2048)), vocab


class PolicyService(ModelService):
    """The policy's Triton client (`engine`), weights updater, generation log and weights
    follower, behind `servicer`."""

    name = "policy"
    settings_type = PolicySettings
    control_methods = ("/rlhf.v1.PolicyService/UpdateWeights",)

    @classmethod
    def triton_spec(cls, settings: PolicySettings) -> PythonModelSpec:
        return python_model_spec(
            settings,
            "services.policy.triton_model:PolicyTritonModel",
            INPUTS,
            OUTPUTS,
            decoupled=True,
            weights_root=Path(settings.weights_root).resolve(),
            initial_version=settings.initial_weights_version,
            scheduler=settings.scheduler,
            share_prefix=settings.share_prefix,
            max_rows=settings.max_batch_rows,
            max_kv_tokens=settings.max_kv_tokens,
        )

    def __init__(self, settings: PolicySettings, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry)
        store = WeightsStore(Path(settings.weights_root).resolve())
        self.engine = PolicyEngine(settings.triton, settings.triton_model)
        version, info = self.engine.control(settings.weights_sync_timeout_s)
        metrics = PolicyMetrics(self.server.registry)
        metrics.weights_version.set(version)
        updater = WeightsUpdater(
            store,
            files_specs(folder_weight_files(settings.model_dir)),
            version,
            swap=lambda: self.engine.control(settings.weights_sync_timeout_s)[0],
            on_version=metrics.weights_version.set,
            base_folders={settings.initial_weights_version: Path(settings.model_dir)},
        )
        self.side_channel = None
        if settings.weights_side_channel:
            self.side_channel = updater.side_channel = SideChannelListener(
                settings.grpc.host,
                settings.weights_side_channel_port,
                settings.weights_side_channel_ticket_ttl_s,
            )
        self.producer = self.follower = None
        if settings.log_generations or settings.follow_weights_topic:
            ensure_topics(settings.kafka, [t for t in TOPICS if t.name in (GENERATIONS, WEIGHTS)])
        if settings.log_generations:
            self.producer = make_producer(settings.kafka)
        tokenizer = load_tokenizer(settings.model_dir)
        context, head_vocab = model_limits(settings.model_dir)
        limits = Limits(
            served_name=settings.served_name,
            max_prompts=settings.max_prompts,
            max_n=settings.max_n,
            max_sequences=settings.max_sequences_per_request,
            max_total_tokens=min(settings.max_total_tokens, context),
            default_max_new_tokens=settings.default_max_new_tokens,
            max_stop_strings=settings.max_stop_strings,
            vocab_size=min(len(tokenizer), head_vocab or len(tokenizer)),
        )
        self.servicer = PolicyServicer(
            self.engine,
            tokenizer,
            limits,
            updater,
            metrics,
            info,
            settings.max_queued_sequences,
            self.producer,
            settings.kafka_ack_timeout_s,
            settings.triton.timeout_s,
            admission=Admission(
                settings.max_queued_sequences,
                settings.max_kv_tokens,
                settings.admission == "queue",
                settings.admission_queue_timeout_s,
            ),
        )
        self.server.add(add_to_server, self.servicer, "rlhf.v1.PolicyService")
        if settings.follow_weights_topic:
            names = {settings.served_name, settings.triton_model}
            self.follower = WeightsFollower(settings.kafka, names, updater, metrics)
            self.follower.start()
        log.info("policy %s ready at weights version %s", settings.served_name, version)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.side_channel is not None:
            self.side_channel.close()
        if self.producer is not None:
            self.producer.flush(timeout=10)
            self.producer.close(timeout=10)
        self.engine.close()
