"""Settings shared by the services, read from the environment.

Each service defines its own `BaseSettings` with an env prefix (`RLHF_POLICY_`, ...) and nests the
shared blocks below, which have prefixes of their own so that one variable configures every
service of a deployment (the Helm chart sets them once per release):

    RLHF_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092
    RLHF_TRITON_URL=127.0.0.1:8001
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "gpu"]
"""Where a model service's Triton instance runs. `auto` asks the process that writes the Triton
model whether it sees a GPU; in Kubernetes that is the init container, which has none, so the
chart always sets cpu or gpu."""
DEVICE_HELP = "Triton instance kind: cpu, gpu, or auto (a GPU when the writing process sees one)."

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""Model weights' dtype inside Triton; `auto` is bfloat16 on a GPU and float32 on the CPU."""
DTYPE_HELP = "Weights dtype: float32, bfloat16, float16, or auto (bfloat16 on a GPU, float32 on CPU)."


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
