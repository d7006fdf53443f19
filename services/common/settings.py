"""Settings shared by the services, read from the environment.

Each service defines its own `BaseSettings` with an env prefix (`RLHF_POLICY_`, ...) and nests the
shared blocks below, which have prefixes of their own so that one variable configures every
service of a deployment (the Helm chart sets them once per release):

    RLHF_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092
    RLHF_KAFKA_SECURITY_PROTOCOL=SASL_SSL        # and RLHF_KAFKA_SSL_* / RLHF_KAFKA_SASL_*
    RLHF_TRITON_URL=127.0.0.1:8001

The model services (policy, reward, reference) subclass `ModelServiceSettings`, which gives them
one scheme: `RLHF_<SVC>_<FIELD>` for their fields and `RLHF_<SVC>_GRPC_<FIELD>` for their gRPC
server block (`RLHF_REWARD_GRPC_PORT`, `RLHF_REWARD_GRPC_METRICS_PORT`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, model_validator
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


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class _MaskedStr(str):
    """A str whose repr hides it: kafka-python's admin client logs its configuration dict (each
    value's repr) at DEBUG. Its DEBUG wire dumps still show the PLAIN login bytes, which is one
    reason services/common/logging.py keeps the `kafka` logger at WARNING."""

    def __repr__(self) -> str:
        return "'**********'"


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster, and how to authenticate to it.

    The security fields are one description for both clients: `kafka_python_config` and
    `librdkafka_config` translate them into each one's option names, and every producer,
    consumer and admin client of the platform is built with them.
    """

    # A validation error would otherwise quote the whole input, the SASL password included.
    model_config = SettingsConfigDict(
        env_prefix="RLHF_KAFKA_", extra="ignore", hide_input_in_errors=True
    )

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of brokers."
    )
    client_id: str = Field("rlhf", description="Client id reported to the brokers.")
    request_timeout_ms: int = Field(15_000, ge=1_000, description="Broker request timeout.")
    delivery_timeout_ms: int = Field(
        30_000, ge=1_000, description="How long a produced record may wait for acks in total."
    )
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT",
        description="PLAINTEXT, SSL (TLS; mutual with a client certificate), SASL_SSL (TLS and "
        "a SASL login) or SASL_PLAINTEXT (a SASL login without TLS).",
    )
    ssl_ca_file: Path | None = Field(
        None,
        description="PEM file of the CA certificates that sign the brokers' certificates; "
        "unset: the system's trust store.",
    )
    ssl_cert_file: Path | None = Field(
        None, description="PEM client certificate (chain), for mutual TLS; needs ssl_key_file."
    )
    ssl_key_file: Path | None = Field(
        None, description="PEM private key (unencrypted) of ssl_cert_file."
    )
    ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to."
    )
    sasl_mechanism: SaslMechanism = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    sasl_username: str | None = Field(None, description="SASL user (SASL_* protocols).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (SASL_* protocols); in no repr, log line or error."
    )

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        # Security options a protocol does not use would be dropped without a word; a client
        # that silently connects without the TLS or login it was given is worse than one that
        # does not start.
        env = "RLHF_KAFKA_"
        problems = []
        ssl_files = [
            n for n in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file") if getattr(self, n)
        ]
        if ssl_files and not self.uses_ssl:
            names = ", ".join(env + n.upper() for n in ssl_files)
            problems.append(f"{names} given, but {self.security_protocol} does not use TLS")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            problems.append(
                f"{env}SSL_CERT_FILE and {env}SSL_KEY_FILE go together (a client certificate "
                "and its private key)"
            )
        credentials = self.sasl_username is not None or self.sasl_password is not None
        if self.uses_sasl and not (self.sasl_username and self.sasl_password):
            problems.append(
                f"{self.security_protocol} needs {env}SASL_USERNAME and {env}SASL_PASSWORD"
            )
        elif credentials and not self.uses_sasl:
            problems.append(
                f"SASL credentials given, but {self.security_protocol} does not log in "
                "(SASL_SSL or SASL_PLAINTEXT do)"
            )
        if problems:
            raise ValueError("Kafka security settings: " + "; ".join(problems))
        return self

    def kafka_python_config(self) -> dict[str, object]:
        """The security options in kafka-python's names (KafkaProducer, KafkaConsumer and
        KafkaAdminClient take the same ones)."""
        config: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.uses_ssl:
            config["ssl_check_hostname"] = self.ssl_check_hostname
            for option, path in (
                ("ssl_cafile", self.ssl_ca_file),
                ("ssl_certfile", self.ssl_cert_file),
                ("ssl_keyfile", self.ssl_key_file),
            ):
                if path is not None:
                    config[option] = str(path)
        if self.uses_sasl:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            config["sasl_plain_password"] = _MaskedStr(self.sasl_password.get_secret_value())
        return config

    def librdkafka_config(self) -> dict[str, str]:
        """The security options in librdkafka's names (confluent-kafka's Producer, Consumer
        and AdminClient)."""
        config = {"security.protocol": self.security_protocol.lower()}
        if self.uses_ssl:
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
            for option, path in (
                ("ssl.ca.location", self.ssl_ca_file),
                ("ssl.certificate.location", self.ssl_cert_file),
                ("ssl.key.location", self.ssl_key_file),
            ):
                if path is not None:
                    config[option] = str(path)
        if self.uses_sasl:
            config["sasl.mechanisms"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        return config


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
