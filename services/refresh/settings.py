"""Reward-model refresh settings, read from the environment with the prefix `RLHF_REFRESH_`.

    RLHF_REFRESH_BASE_MODEL_DIR=/models/reward/v1 RLHF_REFRESH_VERSIONS_ROOT=/models/reward \
    RLHF_REFRESH_REWARD_ADDRESS=reward:50052 python -m services.refresh
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import topics
from services.common.settings import KafkaSettings


class RefreshSettings(BaseSettings):
    """The reward trainer that refreshes the served reward model from `rlhf.preferences.v1`."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REFRESH_", extra="ignore")

    state_dir: Path = Field(Path(".local/refresh"), description="Folder of the sqlite pair store.")
    versions_root: Path = Field(
        Path(".local/refresh/versions"),
        description="Published versions are written here as v00000002/, ... (a path the reward service reads).",
    )
    base_model_dir: Path = Field(
        ..., description="The reward-model folder the reward service serves at start."
    )
    base_version: int = Field(1, ge=1, description="The version number of `base_model_dir`.")
    reward_address: str = Field(
        "127.0.0.1:50052", description="host:port of the gRPC RewardService to reload."
    )
    topic: str = Field(topics.PREFERENCES, description="Topic of the PreferenceRecords.")
    group_id: str = Field("rlhf-reward-refresh", description="Kafka consumer group.")
    refresh_every: int = Field(256, ge=1, description="New training pairs that trigger a refresh.")
    base_trained_on_existing: bool = Field(
        False,
        description="The pairs already on the topic when the refresh first starts are what "
        "base_model_dir was trained on: they are kept as held-out and replay data, and only "
        "pairs that arrive later count towards refresh_every.",
    )
    min_held_out: int = Field(
        16, ge=1, description="Held-out pairs needed before the first refresh may be judged."
    )
    max_held_out: int = Field(
        2048, ge=1, description="Held-out pairs evaluated at most (the newest ones)."
    )
    held_out_modulus: int = Field(
        10, ge=2, description="A prompt is held out when int(prompt hash) % modulus == 0."
    )
    replay_ratio: float = Field(
        1.0, ge=0, description="Older training pairs replayed per new pair in a refresh."
    )
    epochs: int = Field(2, ge=1, description="Passes over the new + replay mix per refresh.")
    batch_size: int = Field(16, ge=1, description="Pairs per optimizer step.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (constant).")
    max_length: int = Field(
        512,
        ge=8,
        description="Tokens per (prompt, response) pair; must equal the reward service's.",
    )
    tolerance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Held-out accuracy may drop by at most this to publish (0: not at all).",
    )
    significance: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="When > 0, a drop beyond tolerance still publishes unless it is significant "
        "at this level: a one-sided exact McNemar test on the held-out pairs the two versions "
        "rank differently (0: tolerance alone decides).",
    )
    keep_versions: int = Field(3, ge=1, description="Published version folders kept on disk.")
    reload_attempts: int = Field(
        3,
        ge=1,
        description="Tries of ReloadModel when the service is unreachable (a refusal is final).",
    )
    reload_timeout_s: float = Field(300.0, gt=0, description="Deadline of one ReloadModel call.")
    human_weight: float = Field(
        1.0, ge=0, description="Loss weight of a human-labelled pair (relative to ai_weight)."
    )
    ai_weight: float = Field(
        1.0,
        ge=0,
        description="Loss weight of an AI-labelled pair (source PREFERENCE_SOURCE_AI, RLAIF); "
        "0 trains on the human pairs alone.",
    )
    device: str = Field("auto", description="`auto` (CUDA when present), `cpu`, `cuda:0`, ...")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads for torch; 0 keeps torch's default."
    )
    seed: int = Field(0, description="Seed of shuffling, replay sampling and torch.")
    poll_timeout_ms: int = Field(500, ge=10, description="Longest wait of one poll.")
    max_poll_records: int = Field(500, ge=1, description="Records stored per transaction.")
    max_poll_interval_ms: int = Field(
        1_800_000,
        ge=10_000,
        description="A refresh runs between two polls; one longer than this makes the group reassign partitions.",
    )
    metrics_port: int = Field(9106, ge=0, le=65535, description="Prometheus port; 0 disables.")
    log_level: str = Field("INFO", description="Root log level.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection.")

    @model_validator(mode="after")
    def _some_pairs_count(self) -> RefreshSettings:
        if self.human_weight == 0 and self.ai_weight == 0:
            raise ValueError("human_weight and ai_weight are both 0: no pair would train")
        return self
