"""Settings of the trainer service (env prefix `RLHF_TRAINER_`), with the shared Kafka block.

    RLHF_TRAINER_MODEL_DIR=/models/policy-init RLHF_TRAINER_ALGORITHM=grpo \
    RLHF_TRAINER_POLICY_ADDRESSES=policy-0:50051,policy-1:50051 python -m services.trainer
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common import topics
from services.common.settings import KafkaSettings
from services.trainer.weights_push import DEFAULT_CHUNK_BYTES


class TrainerSettings(BaseSettings):
    """Everything the trainer service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="RLHF_TRAINER_", extra="ignore")

    model_dir: Path = Field(
        ..., description="Hugging Face folder of the initial policy (safetensors)."
    )
    model_name: str = Field("policy", description="Model name: the Kafka key of weights events.")
    algorithm: str = Field("grpo", description="RL algorithm name (ppo, grpo, rloo).")
    learner: dict = Field(
        default_factory=dict,
        description="Extra LearnerConfig fields (JSON), e.g. lr, kl_coef; the reward-hacking "
        "guards, all off by default: kl_budget, uncertainty_penalty, length_penalty, "
        "length_normalise.",
    )
    batch_size: int = Field(8, ge=1, description="Rollouts per update and rank (whole groups).")
    max_staleness: int = Field(
        2, ge=0, description="Rollouts more than this many versions behind the trainer are dropped."
    )
    initial_weights_version: int = Field(
        1, ge=0, description="Version of the weights in model_dir."
    )
    push_every: int = Field(1, ge=1, description="Publish a new weights version every k updates.")
    checkpoint_every: int = Field(1, ge=1, description="Write a checkpoint every k updates.")
    max_steps: int = Field(0, ge=0, description="Stop after this many updates; 0 runs forever.")
    idle_exit_s: float = Field(
        0.0, ge=0, description="Exit after this long with no new rollouts; 0 never."
    )
    state_dir: Path = Field(
        Path(".local/trainer"), description="Checkpoints, weights and the metrics log."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Completed checkpoints kept on disk.")
    checkpoint_in_background: bool = Field(
        True,
        description="Single-process trainers: take a copy of the state at the checkpoint and "
        "write it on a thread beside the next update; offsets are committed, and the version "
        "pushed, only once it is on disk (unless push_before_durable). False (and every "
        "multi-rank trainer) writes it on the training path, as before.",
    )
    push_before_durable: bool = Field(
        True,
        description="With the background checkpoint: push a version as soon as its file is "
        "written, without waiting for its step's checkpoint. After a crash the trainer resumes "
        "from its last checkpoint under a number past every version folder already written "
        "(services/trainer/loop.py, resume_version), so no number names two sets of weights. "
        "False: a version is pushed only once its checkpoint is on disk.",
    )
    consumer_group: str = Field(
        "rlhf-trainer", description="Kafka consumer group (offsets for lag)."
    )
    rollouts_topic: str = Field(topics.ROLLOUTS, description="Topic the rollouts arrive on.")
    weights_topic: str = Field(topics.WEIGHTS, description="Topic new versions are announced on.")
    policy_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host:port of every policy replica (comma-separated in env).",
    )
    push_chunk_bytes: int = Field(
        DEFAULT_CHUNK_BYTES,
        ge=1024,
        description="Bytes per UpdateWeights chunk (1 and 4 MiB measured alike, 16 MiB slower: bench/weight_swap.py).",
    )
    push_timeout_s: float = Field(300.0, gt=0, description="Deadline of one push to one replica.")
    push_transport: Literal["side_channel", "stream"] = Field(
        "side_channel",
        description="How a push's bytes travel: side_channel (raw TCP opened with a one-time "
        "token from UpdateWeights, services/common/side_channel.py; plaintext but authenticated "
        "and BLAKE3-checked; a replica that offers none is streamed to) or stream (chunks in the "
        "UpdateWeights call, encrypted where gRPC uses TLS).",
    )
    push_in_background: bool = Field(
        True,
        description="Write, push and announce each version on a thread beside the next update "
        "(at most one push in flight, the newest version wins); false does it on the training "
        "path, as before.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=4 * 1024 * 1024, description="gRPC message limit on the push channel."
    )
    log_weights_digest: bool = Field(
        False,
        description="Log a sha256 of the policy weights after every update (multi-rank checks).",
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables."
    )
    lora_rank: int = Field(
        0,
        ge=0,
        description="LoRA rank: train peft adapters on the frozen base and push only "
        "them (the policy merges them at the swap); 0 trains every weight.",
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (update scaled by alpha/rank).")
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Modules that get adapters (comma-separated in env).",
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    seed: int = Field(0, description="Seed of torch, numpy and random at a fresh start.")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings,
        description="Shared Kafka block (its own RLHF_KAFKA_ prefix).",
    )

    @field_validator("policy_addresses", "lora_target_modules", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value

    @property
    def lora(self) -> dict:
        """The LoRA fields of LearnerConfig."""
        return {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_target_modules": tuple(self.lora_target_modules),
            "lora_dropout": self.lora_dropout,
        }

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def weights_dir(self) -> Path:
        return self.state_dir / "weights"

    @property
    def metrics_log(self) -> Path:
        return self.state_dir / "metrics.jsonl"
