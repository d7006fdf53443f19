"""Settings of the reward service, from the environment (prefix `RLHF_REWARD_`).

RLHF_REWARD_MODEL_DIR=/models/reward/v7 RLHF_REWARD_MODEL_VERSION=7
RLHF_REWARD_GRPC_PORT=50052 RLHF_REWARD_GRPC_METRICS_PORT=9102   # the gRPC block
RLHF_TRITON_URL=triton:8001                                        # shared Triton block
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.grpc_server import GrpcSettings
from services.common.settings import DEVICE_HELP, DTYPE_HELP, Device, Dtype, TritonSettings


class RewardGrpcSettings(GrpcSettings):
    """The shared gRPC server block, read from `RLHF_REWARD_GRPC_*`."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REWARD_GRPC_", extra="ignore")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9102, ge=0, le=65535, description="Prometheus /metrics port; 0 disables."
    )


class RewardSettings(BaseSettings):
    """Everything the reward service needs to run."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REWARD_", extra="ignore")

    model_dir: Path = Field(
        description="Reward-model folder served at start (safetensors, config, tokenizer)."
    )
    model_version: int = Field(1, ge=1, description="Version number of the folder served at start.")
    model_name: str = Field(
        "reward", description="Model name clients may put in requests ('' also accepted)."
    )
    triton_model: str = Field("reward", description="Name of the model inside Triton.")
    max_length: int = Field(
        512, ge=8, description="Tokens per (prompt, response) pair; must equal the trainer's."
    )
    max_pairs: int = Field(256, ge=1, description="Pairs one Score request may hold.")
    max_text_chars: int = Field(
        32_000, ge=1, description="Characters a rendered prompt or a response may hold."
    )
    triton_max_batch_size: int = Field(
        32, ge=1, description="Pairs the Triton dynamic batcher runs at once."
    )
    triton_queue_delay_us: int = Field(
        2_000, ge=0, description="How long Triton waits to fill a batch."
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: Dtype = Field("auto", description=DTYPE_HELP)
    model_repository: Path | None = Field(
        None,
        description="Write the Triton model here and load it at start; unset when deployment does it.",
    )
    versions_root: Path | None = Field(
        None,
        description="Folder of published versions (the refresh's, on a shared volume): the service "
        "serves the version its CURRENT file names, at start and whenever it changes.",
    )
    follow_interval_s: float = Field(
        10.0, gt=0, description="How often the service re-reads versions_root/CURRENT."
    )
    grpc: GrpcSettings = Field(default_factory=RewardGrpcSettings, description="gRPC server block.")
    triton: TritonSettings = Field(
        default_factory=TritonSettings, description="How to reach Triton."
    )
