"""Settings of the policy service, from `RLHF_POLICY_*` environment variables; the gRPC block is
`RLHF_POLICY_GRPC_*` and the shared blocks keep their own prefixes (`RLHF_KAFKA_*`,
`RLHF_TRITON_*`): services.common.settings.ModelServiceSettings.

RLHF_POLICY_MODEL_DIR=/models/policy RLHF_POLICY_WEIGHTS_ROOT=/weights
RLHF_POLICY_GRPC_PORT=50051 RLHF_POLICY_GRPC_METRICS_PORT=9100   # the gRPC block
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import KafkaSettings, ModelServiceSettings


class PolicySettings(ModelServiceSettings):
    """Everything the policy service needs to start."""

    model_config = SettingsConfigDict(env_prefix="RLHF_POLICY_")

    model_dir: Path = Field(
        Path("models/smollm2-135m-instruct"),
        description="Hugging Face folder of the initial policy (safetensors, tokenizer).",
    )
    model_name: str = Field(
        "", description="Name clients ask for; empty means the model folder's name."
    )
    triton_model: str = Field("policy", description="Name of the model inside Triton.")
    weights_root: Path = Field(
        Path(".local/policy-weights"),
        description="Folder shared with the Triton container where accepted versions are written.",
    )
    initial_weights_version: int = Field(
        1, ge=0, description="Version of the weights in model_dir."
    )
    triton_queue_delay_us: int = Field(
        100_000,
        ge=0,
        description="How long Triton's batcher waits to fill a batch. A generation runs for "
        "seconds and nothing joins a batch once it started (no continuous batching), so a request "
        "that misses one waits for all of it: 0.1 s lets a burst of clients, whose requests arrive "
        "over tens of milliseconds, share one batch (16 clients: 80 tokens/s in one batch against "
        "29 split in two, bench/generation.py), and costs a lone request 0.1 s.",
    )
    max_prompts: int = Field(64, ge=1, description="Most prompts in one Generate request.")
    max_n: int = Field(16, ge=1, description="Most samples per prompt.")
    max_sequences_per_request: int = Field(64, ge=1, description="Most prompts x n in one request.")
    max_queued_sequences: int = Field(
        256,
        ge=1,
        description="Sequences admitted to Triton at once (queued or generating); beyond it "
        "RESOURCE_EXHAUSTED.",
    )
    max_total_tokens: int = Field(
        4096,
        ge=2,
        description="Cap on prompt + max_new_tokens (the model's context is the other cap).",
    )
    default_max_new_tokens: int = Field(
        64, ge=1, description="Used when a request leaves max_new_tokens at 0."
    )
    max_stop_strings: int = Field(8, ge=0, description="Most stop strings per request.")
    log_generations: bool = Field(
        True, description="Write every generation to rlhf.generations.v1 before the RPC returns."
    )
    kafka_ack_timeout_s: float = Field(
        10.0, gt=0, description="How long a generation waits for Kafka's acks=all."
    )
    follow_weights_topic: bool = Field(
        True, description="Catch up from rlhf.weights.v1 announcements."
    )
    weights_sync_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long UpdateWeights waits for Triton to swap (a running batch finishes "
        "first).",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).name
