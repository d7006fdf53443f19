"""Settings of the rollout worker (env prefix `RLHF_ROLLOUT_`), with the shared Kafka block.

    RLHF_ROLLOUT_DATASET=data/prompts.jsonl RLHF_ROLLOUT_POLICY_ADDRESS=policy:50051 \
    RLHF_ROLLOUT_REWARD_ADDRESS=reward:50051 RLHF_ROLLOUT_REFERENCE_ADDRESS=reference:50051 \
    python -m services.rollout
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import topics
from services.common.settings import KafkaSettings


class RolloutSettings(BaseSettings):
    """Everything the rollout worker reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="RLHF_ROLLOUT_", extra="ignore")

    dataset: Path = Field(
        ..., description="JSONL or Parquet file with a `prompt` or `messages` column."
    )
    live_prompt_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of prompts taken from recent live generations (0: none).",
    )
    live_prompt_buffer: int = Field(
        1024, ge=1, description="Recent live prompts kept to draw from."
    )
    policy_address: str = Field(
        "127.0.0.1:50051",
        description="PolicyService host:port (a headless Service reaches every replica), or a "
        "comma-separated list of replicas.",
    )
    reward_address: str = Field("127.0.0.1:50052", description="RewardService, as policy_address.")
    reference_address: str = Field(
        "127.0.0.1:50053", description="ReferenceService, as policy_address."
    )
    model_name: str = Field(
        "policy", description="Policy model name (the key of its weights events)."
    )
    samples_per_prompt: int = Field(4, ge=1, description="n: samples per prompt, one group.")
    prompts_per_call: int = Field(4, ge=1, description="Prompts per Generate call.")
    max_new_tokens: int = Field(64, ge=1, description="Upper bound on generated tokens per sample.")
    temperature: float = Field(
        1.0, ge=0, description="Sampling temperature (the trainer must match it)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k filtering; 0 disables it.")
    max_staleness: int = Field(
        2, ge=0, description="Pause when new rollouts would be this many versions stale."
    )
    trainer_group: str = Field(
        "rlhf-trainer", description="The trainer's consumer group (for its backlog)."
    )
    rollouts_per_version: int = Field(
        8,
        ge=1,
        description="Rollouts the trainer uses per weights version (batch size x ranks x push_every).",
    )
    rollouts_topic: str = Field(topics.ROLLOUTS, description="Topic rollouts go to.")
    weights_topic: str = Field(
        topics.WEIGHTS, description="Topic the trainer announces versions on."
    )
    generations_topic: str = Field(topics.GENERATIONS, description="Topic of live generations.")
    gold_annotator: str = Field(
        "",
        description="module:function scoring (prompt, answer) independently of the reward model "
        "(a rule, a judge); when set, each round's mean is exported as rlhf_rollout_gold_mean "
        "beside rlhf_rollout_reward_mean: reward rising while gold does not is reward hacking.",
    )
    annotation_min_disagreement: float | None = Field(
        None,
        le=0.5,
        description="Offer a group to people (rlhf.annotation-queue.v1) when the reward ensemble "
        "disagrees on ordering it by at least this much: the largest over answer pairs of the "
        "members' std of sigmoid(s_i - s_j), in [0, 0.5] (services/common/disagreement.py). "
        "Unset or negative: off. 0.1 is a sensible start (members differing by ~0.2 in P(i "
        "better than j) on some pair); 0 offers every group. Needs an ensemble reward model.",
    )
    annotation_topic: str = Field(
        topics.ANNOTATION_QUEUE, description="Topic annotation candidates go to."
    )
    max_rollouts: int = Field(0, ge=0, description="Stop after this many rollouts; 0 runs forever.")
    epochs: int = Field(0, ge=0, description="Passes over the dataset; 0 loops forever.")
    seed: int = Field(0, description="Seed of prompt order and sampling.")
    timeout_s: float = Field(120.0, gt=0, description="Deadline of each RPC.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=4 * 1024 * 1024, description="gRPC message limit."
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables."
    )
    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings,
        description="Shared Kafka block (its own RLHF_KAFKA_ prefix).",
    )
