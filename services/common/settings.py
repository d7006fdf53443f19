"""Settings shared by the services, read from the environment.

Each service defines its own `BaseSettings` with an env prefix (`RLHF_POLICY_`, ...) and nests the
shared blocks below, which have prefixes of their own so that one variable configures every
service of a deployment (the Helm chart sets them once per release):

    RLHF_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092
    RLHF_TRITON_URL=127.0.0.1:8001

The model services (policy, reward, reference) subclass `ModelServiceSettings`, which gives them
one scheme: `RLHF_<SVC>_<FIELD>` for their fields and `RLHF_<SVC>_GRPC_<FIELD>` for their gRPC
server block (`RLHF_REWARD_GRPC_PORT`, `RLHF_REWARD_GRPC_METRICS_PORT`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.grpc_server import GrpcSettings

Device = Literal["auto", "cpu", "gpu"]
"""Where a model service's Triton instance runs. `auto` asks the process that writes the Triton
model whether it sees a GPU; in Kubernetes that is the init container, which has none, so the
chart always sets cpu or gpu."""
DEVICE_HELP = "Triton instance kind: cpu, gpu, or auto (a GPU when the writing process sees one)."

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""Model weights' dtype inside Triton; `auto` is bfloat16 on a GPU and float32 on the CPU."""
DTYPE_HELP = (
    "Weights dtype: float32, bfloat16, float16, or auto (bfloat16 on a GPU, float32 on CPU)."
)


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster."""

    model_config = SettingsConfigDict(env_prefix="RLHF_KAFKA_", extra="ignore")

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of brokers."
    )
    client_id: str = Field("rlhf", description="Client id reported to the brokers.")
    request_timeout_ms: int = Field(15_000, ge=1_000, description="Broker request timeout.")
    delivery_timeout_ms: int = Field(
        30_000, ge=1_000, description="How long a produced record may wait for acks in total."
    )

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]


class TritonSettings(BaseSettings):
    """How to reach Triton Inference Server."""

    model_config = SettingsConfigDict(env_prefix="RLHF_TRITON_", extra="ignore")

    url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint, host:port.")
    timeout_s: float = Field(60.0, gt=0, description="Default deadline for one inference call.")
    max_message_bytes: int = Field(
        256 * 1024 * 1024, ge=4 * 1024 * 1024, description="gRPC message size limit to Triton."
    )


class ModelServiceSettings(BaseSettings):
    """What every model service reads; a service's subclass sets its env prefix
    (`model_config = SettingsConfigDict(env_prefix="RLHF_REWARD_")`) and `default_ports`, adds
    its own fields and overrides the defaults that differ."""

    model_config = SettingsConfigDict(extra="ignore")

    default_ports: ClassVar[tuple[int, int]] = (50051, 9100)
    """gRPC and /metrics ports when `RLHF_<SVC>_GRPC_PORT` / `_GRPC_METRICS_PORT` are unset."""

    model_dir: Path = Field(
        description="Model folder served at start (safetensors, config.json, tokenizer)."
    )
    triton_model: str = Field(description="Name of the model inside Triton.")
    model_repository: Path | None = Field(
        None,
        description="Write the Triton model here and load it at start (local runs, tests); unset "
        "when the deployment does it (Kubernetes: an init container).",
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: Dtype = Field("auto", description=DTYPE_HELP)
    triton_max_batch_size: int = Field(
        32, ge=1, description="Rows (sequences, pairs) the Triton dynamic batcher runs at once."
    )
    triton_queue_delay_us: int = Field(
        2_000, ge=0, description="How long Triton waits to fill a batch."
    )
    triton_health_interval_s: float = Field(
        2.0,
        ge=0,
        description="How often the service checks that Triton serves its model (health and "
        "admission follow it); 0 disables the check.",
    )
    grpc: GrpcSettings = Field(
        description="gRPC server block, from `RLHF_<SVC>_GRPC_<FIELD>` (filled in when not given)."
    )
    triton: TritonSettings = Field(
        default_factory=TritonSettings, description="How to reach Triton."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_grpc_block(cls, data: object) -> object:
        # A default_factory cannot know the subclass, whose prefix and ports the block needs.
        if isinstance(data, dict) and "grpc" not in data:
            port, metrics_port = cls.default_ports
            prefix = cls.model_config.get("env_prefix", "") + "GRPC_"
            data = {**data, "grpc": GrpcSettings.read(prefix, port=port, metrics_port=metrics_port)}
        return data
