"""Runs the real gateway (`python -m services.gateway`, uvicorn) on a free port for a test,
and reads Kafka topics back from their beginning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer, TopicPartition

from deploy.local.process import free_port
from services.common.kafka import decode
from services.common.settings import KafkaSettings
from services.gateway.auth import sha256_hex

REPO = Path(__file__).resolve().parents[3]
API_KEY = "integration-test-key"


@dataclass
class Gateway:
    url: str
    api_key: str
    log_file: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@contextmanager
def running_gateway(
    kafka: KafkaSettings,
    log_dir: Path,
    policy_url: str = "127.0.0.1:9",
    httpx_options: dict | None = None,
    **settings: object,
) -> Iterator[Gateway]:
    """`httpx_options` (verify=an ssl.SSLContext) reach a gateway started with TLS settings."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RLHF_GATEWAY_API_KEY_SHA256": sha256_hex(API_KEY),
        "RLHF_GATEWAY_HOST": "127.0.0.1",
        "RLHF_GATEWAY_PORT": str(port),
        "RLHF_GATEWAY_POLICY_URL": policy_url,
        "RLHF_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
    }
    env.update({f"RLHF_GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"gateway-{port}.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        scheme = "https" if "tls_cert_file" in settings else "http"
        url = f"{scheme}://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {proc.returncode}:\n{log_file.read_text()}"
                )
            try:
                if (
                    httpx.get(f"{url}/healthz", timeout=1, **(httpx_options or {})).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway did not answer:\n{log_file.read_text()}")
            time.sleep(0.2)
        yield Gateway(url, API_KEY, log_file)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_topic(
    kafka: KafkaSettings,
    topic: str,
    message_type,
    done: Callable[[list], bool] | None = None,
    timeout_s: float = 30.0,
) -> list:
    """Every record of `topic` from the beginning, decoded: polled until `done(records)`, or,
    without `done`, until the end offsets of when it started."""
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        found: list = []
        deadline = time.monotonic() + timeout_s
        while True:
            for records in consumer.poll(timeout_ms=300).values():
                for r in records:
                    try:
                        found.append(decode(message_type, r.value))
                    except DecodeError:
                        # The session's topics are shared: the dead-letter and chaos tests put
                        # poison records there on purpose. Callers look for their own ids.
                        continue
            if done(found) if done else all(consumer.position(tp) >= end[tp] for tp in parts):
                return found
            if time.monotonic() > deadline:
                return found  # the caller's assertion says what is missing
    finally:
        consumer.close()
