"""A single-node Apache Kafka broker in KRaft mode, run from the jars `make setup` resolved.

The storage is formatted once per data folder (a `meta.properties` marks it); ports are free ones
unless given; the topics of `services.common.topics` are created once the broker answers.

With `tls` (off by default) the broker also listens for SSL with mutual TLS (a client must show a
certificate the CA signed) and for SASL_SSL (TLS and a PLAIN login of one of `tls.sasl_users`),
beside the PLAINTEXT listener that stays for the broker's own use and the platform's tests:

    broker = KafkaBroker(state_dir, tls=BrokerTls(ca_file, cert_file, key_file, {"alice": pw}))
    broker.client_settings("SSL", ssl_ca_file=ca_file, ssl_cert_file=..., ssl_key_file=...)
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.local.process import Daemon, free_port, port_open

if TYPE_CHECKING:
    from services.common.settings import KafkaSettings, SecurityProtocol

DEFAULT_LIBS = (
    Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache/rlhf-platform")) / "kafka-4.1.1/libs"
)

LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaServer
        level: INFO
      - name: kafka.server.BrokerServer
        level: INFO
"""


@dataclass(frozen=True)
class BrokerTls:
    """The broker's side of TLS, as PEM files (what Kafka's PEM keystores read)."""

    ca_file: Path
    """CA certificates the broker trusts for client certificates (the SSL listener)."""
    cert_file: Path
    """The broker's certificate (chain); its names must match the host clients connect to."""
    key_file: Path
    """The broker certificate's private key: unencrypted PKCS#8."""
    sasl_users: dict[str, str] = field(default_factory=dict)
    """PLAIN logins the SASL_SSL listener accepts: user name -> password."""


@dataclass
class KafkaBroker:
    """One combined broker+controller node; `bootstrap_servers` is what clients connect to
    (PLAINTEXT), `ssl_bootstrap_servers` and `sasl_ssl_bootstrap_servers` with `tls`."""

    state_dir: Path
    broker_port: int = 0
    controller_port: int = 0
    heap: str = "512m"
    libs: Path | None = None
    tls: BrokerTls | None = None
    ssl_port: int = 0
    sasl_ssl_port: int = 0

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.data_dir = self.state_dir / "kafka-data"
        self.config_file = self.state_dir / "kafka.properties"
        self.daemon = Daemon("kafka", self.state_dir)
        self.libs = Path(self.libs or os.environ.get("RLHF_KAFKA_LIBS") or DEFAULT_LIBS)
        ports_file = self.state_dir / "kafka.ports"
        if ports_file.exists() and not self.broker_port:
            # Restarting a stack keeps its ports: clients and stored metadata refer to them.
            ports = [*map(int, ports_file.read_text().split()), 0, 0]
            self.broker_port, self.controller_port, self.ssl_port, self.sasl_ssl_port = ports[:4]
        self.broker_port = self.broker_port or free_port()
        self.controller_port = self.controller_port or free_port()
        if self.tls is not None:
            self.ssl_port = self.ssl_port or free_port()
            self.sasl_ssl_port = self.sasl_ssl_port or free_port()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.sasl_ssl_port}"

    def client_settings(
        self, protocol: SecurityProtocol = "PLAINTEXT", **fields: object
    ) -> KafkaSettings:
        """Client settings for this broker's listener of `protocol`; `fields` add the client's
        side (CA file, client certificate, SASL login, client id). Every security field is
        given, so RLHF_KAFKA_* of another cluster in the environment cannot leak in."""
        from services.common.settings import KafkaSettings

        servers = {
            "PLAINTEXT": self.bootstrap_servers,
            "SSL": self.ssl_bootstrap_servers,
            "SASL_SSL": self.sasl_ssl_bootstrap_servers,
        }
        if protocol not in servers or (protocol != "PLAINTEXT" and self.tls is None):
            raise ValueError(f"this broker has no {protocol} listener")
        security = {
            name: KafkaSettings.model_fields[name].default
            for name in KafkaSettings.model_fields
            if name.startswith(("ssl_", "sasl_"))
        }
        return KafkaSettings(
            **{
                **security,
                "bootstrap_servers": servers[protocol],
                "security_protocol": protocol,
                **fields,
            }
        )

    def _java(self, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java (17+) is not on PATH")
        if not any(self.libs.glob("kafka_2.13-*.jar")):
            raise RuntimeError(f"no Kafka jars in {self.libs}: run `make setup`")
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.yaml'}",
            "-cp",
            f"{self.libs}/*",
            main_class,
            *args,
        ]

    def write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "log4j2.yaml").write_text(LOG4J2)
        ports = [self.broker_port, self.controller_port]
        if self.tls is not None:
            ports += [self.ssl_port, self.sasl_ssl_port]
        (self.state_dir / "kafka.ports").write_text(" ".join(map(str, ports)) + "\n")
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.broker_port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.broker_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.flush.interval.messages": "9223372036854775807",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
        }
        if self.tls is not None:
            props.update(self._tls_props(props))
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _tls_props(self, props: dict[str, str]) -> dict[str, str]:
        """The SSL and SASL_SSL listeners, added to the PLAINTEXT and CONTROLLER ones."""
        tls = self.tls
        for name, password in tls.sasl_users.items():
            # Both go into a JAAS line between double quotes; refuse what would break out of it.
            if not (name.isascii() and name.isidentifier()) or any(c in password for c in '"\\;\n'):
                raise ValueError(
                    f"SASL user {name!r}: a name [A-Za-z0-9_] and a password "
                    "without quotes, backslashes, semicolons or newlines"
                )
        # A PEM keystore file holds the private key and the certificate chain together.
        keystore = self.state_dir / "broker-keystore.pem"
        keystore.write_text(Path(tls.key_file).read_text() + Path(tls.cert_file).read_text())
        keystore.chmod(0o600)
        users = " ".join(f'user_{name}="{pw}"' for name, pw in tls.sasl_users.items())
        ssl, sasl_ssl = (
            f"SSL://127.0.0.1:{self.ssl_port}",
            f"SASL_SSL://127.0.0.1:{self.sasl_ssl_port}",
        )
        return {
            "listeners": f"{props['listeners']},{ssl},{sasl_ssl}",
            "advertised.listeners": f"{props['advertised.listeners']},{ssl},{sasl_ssl}",
            "listener.security.protocol.map": (
                f"{props['listener.security.protocol.map']},SSL:SSL,SASL_SSL:SASL_SSL"
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(tls.ca_file),
            # Mutual TLS on the SSL listener; the SASL_SSL listener authenticates by login.
            "listener.name.ssl.ssl.client.auth": "required",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_ssl.plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            ),
        }

    def format_storage(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # `--cluster-id=...` in one word: an id may start with "-".
        argv = self._java(
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(self.config_file),
        )
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"kafka storage format failed:\n{out.stdout}\n{out.stderr}")

    def start(self, timeout_s: float = 120.0, create_topics: bool = True) -> None:
        self.write_config()
        self.format_storage()
        self.daemon.start(self._java("kafka.Kafka", str(self.config_file)))
        self.daemon.wait_ready(lambda: port_open(self.broker_port) and self._answers(), timeout_s)
        if create_topics:
            from services.common.kafka import ensure_topics

            ensure_topics(self.client_settings())

    def _answers(self) -> bool:
        from services.common.kafka import connect_admin

        admin = connect_admin(self.client_settings(request_timeout_ms=5000), timeout_s=0)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def stop(self) -> bool:
        return self.daemon.stop(timeout_s=30)

    def kill(self) -> None:
        self.daemon.kill()

    @property
    def running(self) -> bool:
        return self.daemon.pid is not None
