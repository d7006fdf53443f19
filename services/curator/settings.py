"""Curator settings, read from the environment with the prefix `RLHF_CURATOR_`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import KafkaSettings


class CuratorSettings(BaseSettings):
    """The feedback/generation join and its state store."""

    model_config = SettingsConfigDict(env_prefix="RLHF_CURATOR_", extra="ignore")

    state_dir: Path = Field(Path(".local/curator"), description="Folder of the sqlite state store.")
    group_id: str = Field("rlhf-curator", description="Kafka consumer group.")
    max_pending_per_partition: int = Field(
        10_000, ge=1, description="Feedback waiting for its generation, per partition, at most."
    )
    max_pending_age_s: float = Field(
        3600.0, gt=0, description="How long feedback waits for its generation before it expires."
    )
    max_pairs_per_answer: int = Field(
        16,
        ge=0,
        description="Opposite-thumb answers of the same prompt one new judgement pairs with.",
    )
    retention_s: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        description="Generations and seen feedback ids older than this are pruned.",
    )
    poll_timeout_ms: int = Field(500, ge=10, description="Longest wait of one poll.")
    max_poll_records: int = Field(500, ge=1, description="Records processed per transaction.")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Prometheus port; 0 disables.")
    log_level: str = Field("INFO", description="Root log level.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection.")
