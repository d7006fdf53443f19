"""The reward service: gRPC `rlhf.v1.RewardService` in front of the Triton model `reward`.

Start here. Score turns a batch of (prompt, response) pairs into one scalar each, computed inside
Triton (services.reward.triton_model) and named with the reward-model version that produced it;
ReloadModel swaps in a newly published version after checking its checksums and tensor shapes;
with RLHF_REWARD_VERSIONS_ROOT set, the service also serves what that folder's CURRENT names, at
start and whenever it changes (a reload it missed while restarting: services.reward.follower).

    python -m services.reward        # settings from RLHF_REWARD_* (services.reward.settings)

With RLHF_REWARD_MODEL_REPOSITORY set, the service writes its Triton model there and asks Triton
(explicit model control) to load it; otherwise the deployment loads it.

Files: settings.py (configuration), encoding.py (what the model reads), checkpoint.py (reload
checks), triton_model.py (the model inside Triton), scorer.py (logic), servicer.py (gRPC).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from services.common.grpc_server import ModelServer
from services.common.logging import configure_logging
from services.common.triton_client import write_and_load
from services.common.triton_repo import write_model
from services.genproto.rlhf.v1 import reward_pb2_grpc
from services.reward.follower import PublishedFollower
from services.reward.scorer import RewardScorer
from services.reward.servicer import RewardMetrics, RewardServicer
from services.reward.settings import RewardSettings
from services.reward.triton_model import reward_spec


def write_triton_model(settings: RewardSettings) -> Path:
    """Writes the Triton model into `settings.model_repository`; returns its folder."""
    spec = reward_spec(
        settings.triton_model,
        settings.model_dir,
        settings.model_version,
        max_length=settings.max_length,
        max_batch_size=settings.triton_max_batch_size,
        max_queue_delay_us=settings.triton_queue_delay_us,
        device=settings.device,
        dtype=settings.dtype,
    )
    return write_model(settings.model_repository, spec)


def build_server(
    settings: RewardSettings, registry: CollectorRegistry | None = None
) -> tuple[ModelServer, RewardScorer]:
    """A ModelServer with the RewardService added (not started), and its Triton client to close."""
    server = ModelServer("reward", settings.grpc, registry)
    scorer = RewardScorer(settings)
    servicer = RewardServicer(settings, scorer, RewardMetrics(server.registry))
    server.add(
        reward_pb2_grpc.add_RewardServiceServicer_to_server, servicer, "rlhf.v1.RewardService"
    )
    return server, scorer


def follow_published(settings: RewardSettings, scorer: RewardScorer) -> PublishedFollower | None:
    """With `versions_root` set: serves the published version before taking traffic, then
    follows CURRENT (services.reward.follower). Returns the follower to stop, or None."""
    if settings.versions_root is None:
        return None
    follower = PublishedFollower(settings.versions_root, scorer, settings.model_version, settings.follow_interval_s)
    follower.sync()
    return follower.start()


def main() -> None:
    configure_logging("reward")
    settings = RewardSettings()
    write_and_load(settings, write_triton_model)
    server, scorer = build_server(settings)
    follower = follow_published(settings, scorer)
    server.install_signal_handlers()
    server.start()
    server.wait()
    if follower is not None:
        follower.stop()
