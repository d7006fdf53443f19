"""Settings of the reference service, from the environment (prefix `RLHF_REFERENCE_`).

RLHF_REFERENCE_MODEL_DIR=/models/smollm2-135m-instruct
RLHF_REFERENCE_GRPC_PORT=50053 RLHF_REFERENCE_GRPC_METRICS_PORT=9103   # the gRPC block
RLHF_TRITON_URL=triton:8001                                             # shared Triton block
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.grpc_server import GrpcSettings
from services.common.settings import DEVICE_HELP, DTYPE_HELP, Device, Dtype, TritonSettings


class ReferenceGrpcSettings(GrpcSettings):
    """The shared gRPC server block, read from `RLHF_REFERENCE_GRPC_*`."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REFERENCE_GRPC_", extra="ignore")

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9103, ge=0, le=65535, description="Prometheus /metrics port; 0 disables."
    )


class ReferenceSettings(BaseSettings):
    """Everything the reference service needs to run."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REFERENCE_", extra="ignore")

    model_dir: Path = Field(
        description="The frozen reference causal LM (safetensors, config.json)."
    )
    model_version: int = Field(
        1, ge=1, description="Version reported by the version gauge (frozen model)."
    )
    model_name: str = Field(
        "reference", description="Model name clients may put in requests ('' also accepted)."
    )
    triton_model: str = Field("reference", description="Name of the model inside Triton.")
    max_sequences: int = Field(
        256, ge=1, description="Sequences one ComputeLogprobs request may hold."
    )
    max_total_tokens: int | None = Field(
        None,
        ge=2,
        description="Prompt + response tokens per sequence; default: the model's max positions.",
    )
    triton_max_batch_size: int = Field(
        16, ge=1, description="Sequences the Triton dynamic batcher runs at once."
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
    grpc: GrpcSettings = Field(
        default_factory=ReferenceGrpcSettings, description="gRPC server block."
    )
    triton: TritonSettings = Field(
        default_factory=TritonSettings, description="How to reach Triton."
    )
