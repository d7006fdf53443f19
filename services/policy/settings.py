"""Settings of the policy service, from `RLHF_POLICY_*` environment variables; the gRPC block is
`RLHF_POLICY_GRPC_*` and the shared blocks keep their own prefixes (`RLHF_KAFKA_*`,
`RLHF_TRITON_*`): services.common.settings.ModelServiceSettings.

RLHF_POLICY_MODEL_DIR=/models/policy RLHF_POLICY_WEIGHTS_ROOT=/weights
RLHF_POLICY_GRPC_PORT=50051 RLHF_POLICY_GRPC_METRICS_PORT=9100   # the gRPC block
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
        0,
        ge=0,
        description="How long Triton's batcher waits to fill a batch. 0: with the continuous "
        "scheduler a request joins the running batch at the next step, so waiting gains nothing "
        "and a lone request starts at once. The static scheduler needed 100000 (0.1 s) to let a "
        "burst of clients share one batch (bench/generation.py sets it for that baseline).",
    )
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join the running batch at the next decoding step and "
        "leave it when they finish (services/policy/scheduler.py); static: the batcher's group "
        "runs to its end and nothing joins it (the old behaviour, a benchmark baseline).",
    )
    share_prefix: bool = Field(
        True, description="Prefill the n samples of one prompt once (continuous scheduler)."
    )
    max_batch_rows: int = Field(
        32, ge=1, description="Most rows the continuous scheduler decodes together; more wait."
    )
    max_kv_tokens: int = Field(
        131_072,
        ge=1,
        description="Bound on KV-cache memory, in tokens: the prompt + max_new_tokens of every "
        "admitted sequence, summed (SmolLM2-135M: 46 KB a token in float32, so 6 GB). Beyond it, "
        "or beyond max_queued_sequences, the `admission` policy applies.",
    )
    admission: Literal["reject", "queue"] = Field(
        "reject",
        description="Over max_queued_sequences or max_kv_tokens: reject (RESOURCE_EXHAUSTED at "
        "once) or queue (wait for room up to admission_queue_timeout_s and the call's deadline, "
        "then RESOURCE_EXHAUSTED).",
    )
    admission_queue_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for room when admission is `queue`."
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
    weights_side_channel: bool = Field(
        True,
        description="Accept pushes whose bytes come over a raw TCP side channel opened with a "
        "one-time token (services/common/side_channel.py; plaintext but token-authenticated and "
        "digest-checked, also when gRPC uses TLS). Off: pushes stream their chunks over gRPC.",
    )
    weights_side_channel_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="TCP port of the side channel, on the gRPC host; 0 picks a free one (the "
        "port travels with the ticket). Fix it where a NetworkPolicy or firewall must allow it.",
    )
    weights_side_channel_ticket_ttl_s: float = Field(
        30.0, gt=0, description="How long a side-channel token stays usable once issued."
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).name
