"""A single-node Apache Kafka broker in KRaft mode, run from the jars `make setup` resolved.

The storage is formatted once per data folder (a `meta.properties` marks it); ports are free ones
unless given; the topics of `services.common.topics` are created once the broker answers.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from deploy.local.process import Daemon, free_port, port_open

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


@dataclass
class KafkaBroker:
    """One combined broker+controller node; `bootstrap_servers` is what clients connect to."""

    state_dir: Path
    broker_port: int = 0
    controller_port: int = 0
    heap: str = "512m"
    libs: Path | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.data_dir = self.state_dir / "kafka-data"
        self.config_file = self.state_dir / "kafka.properties"
        self.daemon = Daemon("kafka", self.state_dir)
        self.libs = Path(self.libs or os.environ.get("RLHF_KAFKA_LIBS") or DEFAULT_LIBS)
        ports_file = self.state_dir / "kafka.ports"
        if ports_file.exists() and not self.broker_port:
            # Restarting a stack keeps its ports: clients and stored metadata refer to them.
            self.broker_port, self.controller_port = map(int, ports_file.read_text().split())
        self.broker_port = self.broker_port or free_port()
        self.controller_port = self.controller_port or free_port()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

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
        (self.state_dir / "kafka.ports").write_text(f"{self.broker_port} {self.controller_port}\n")
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
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

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
            from services.common.settings import KafkaSettings

            ensure_topics(KafkaSettings(bootstrap_servers=self.bootstrap_servers))

    def _answers(self) -> bool:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(
            bootstrap_servers=[self.bootstrap_servers], request_timeout_ms=5000
        )
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
