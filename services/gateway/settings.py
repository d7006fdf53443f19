"""Gateway settings, read from the environment with the prefix `RLHF_GATEWAY_`.

The API keys are a secret with no default: the gateway refuses to start without them. Only their
sha256 hex digests are configured, never the keys themselves:

    RLHF_GATEWAY_API_KEY_SHA256=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
    RLHF_GATEWAY_POLICY_URL=policy:50051 RLHF_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 \
        python -m services.gateway
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.settings import KafkaSettings

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class GatewaySettings(BaseSettings):
    """Everything the gateway needs; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="RLHF_GATEWAY_", extra="ignore")

    api_key_sha256: Annotated[list[str], NoDecode] = Field(
        ...,
        min_length=1,
        description="Comma-separated sha256 hex digests of the accepted API keys (secret, required).",
    )
    host: str = Field("0.0.0.0", description="Address uvicorn listens on.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port.")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate of the gateway: set with the key, it serves HTTPS."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of the gateway.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA of client certificates: set, every client must present one."
    )
    policy_url: str = Field(
        "127.0.0.1:50051",
        description="PolicyService gRPC endpoint: host:port (a headless Service reaches every "
        "replica) or a comma-separated list.",
    )
    policy_timeout_s: float = Field(120.0, gt=0, description="Deadline of one generation call.")
    reward_url: str | None = Field(
        None,
        min_length=1,
        description="RewardService gRPC endpoint, as policy_url (TLS the same way): set, chat "
        "completions take `best_of` and rank their samples by reward; unset, `best_of` is a 400.",
    )
    reward_timeout_s: float = Field(30.0, gt=0, description="Deadline of one Score call.")
    max_new_tokens_limit: int = Field(
        1024, ge=1, description="Largest `max_tokens` a request may ask."
    )
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["policy"],
        description="Comma-separated names accepted as `model` besides the policy's own name "
        "(GetModelInfo); `policy` is what the chat page and the demo send.",
    )
    publish_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="How long a request waits for Kafka's acks=all before answering 503.",
    )
    rate_limit_per_s: float = Field(50.0, gt=0, description="Sustained requests/s per API key.")
    rate_limit_burst: int = Field(100, ge=1, description="Requests a key may send at once.")
    idempotency_cache_size: int = Field(
        100_000, ge=0, description="Recent idempotency keys remembered by this replica."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS; none by default.",
    )
    ui_dev_api_key: SecretStr | None = Field(
        None, description="Development only: an API key the chat page fills in for the user."
    )
    bench_noop_endpoint: bool = Field(
        False,
        description="Expose POST /v1/bench/noop, the benchmark's baseline (same auth and body).",
    )
    annotation_queue_size: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Annotation candidates a replica keeps for GET /v1/annotation-queue: the "
        "highest-disagreement ones.",
    )
    annotation_answered_memory: int = Field(
        100_000,
        ge=1,
        description="Answered candidate ids a replica remembers, so that a candidate read after "
        "its answer is not offered again.",
    )
    annotation_lookback_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="How far back rlhf.preferences.v1 is read for answered candidates: the "
        "retention of rlhf.annotation-queue.v1 (no older answer can match a kept candidate).",
    )
    log_level: str = Field("INFO", description="Root log level.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection.")

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def uvicorn_tls(self) -> dict[str, object]:
        """uvicorn.run's TLS arguments (none: plain HTTP)."""
        if self.tls_cert_file is None:
            return {}
        tls: dict[str, object] = {
            "ssl_certfile": str(self.tls_cert_file),
            "ssl_keyfile": str(self.tls_key_file),
        }
        if self.tls_client_ca_file is not None:
            tls.update(ssl_ca_certs=str(self.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return tls

    @field_validator("api_key_sha256", "cors_origins", "model_aliases", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        digests = [v.lower() for v in value]
        bad = [d for d in digests if not _SHA256_HEX.match(d)]
        if bad:
            raise ValueError("each API key entry must be a sha256 hex digest (64 hex characters)")
        return digests

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, value: list[str]) -> list[str]:
        if "*" in value:
            raise ValueError("wildcard CORS is refused: list the allowed origins")
        return value
