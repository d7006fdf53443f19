"""Session fixtures: the real Kafka broker and the real Triton server, started once per test
session on free ports and stopped at the end.

They start lazily: a run of unit tests alone starts nothing. A broker or server that fails to
start is an error of every test that needs it, never a skip. State lives under
`.local/pytest/<run>/` so that `python -m deploy.local reap` (called by .ci/run) can stop anything
a killed run left behind.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from deploy.local.kafka import KafkaBroker
from deploy.local.triton import TritonServer
from services.common.settings import KafkaSettings, TritonSettings

REPO_ROOT = Path(__file__).resolve().parent.parent

# The control plane's token (services/common/control_auth.py) for everything this session starts:
# in-process services and callers read it, and subprocesses inherit it. Tests that check the
# refusals set their own.
os.environ.setdefault("RLHF_CONTROL_TOKEN", secrets.token_urlsafe(24))
_started: dict[str, str] = {}


@pytest.fixture(scope="session")
def run_dir() -> Path:
    path = REPO_ROOT / ".local" / "pytest" / f"{os.getpid()}-{int(time.time())}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def kafka_broker(run_dir: Path):
    broker = KafkaBroker(state_dir=run_dir / "kafka")
    try:
        broker.start()
        _started["kafka"] = (
            f"Apache Kafka broker (KRaft) pid {broker.daemon.pid} at {broker.bootstrap_servers}"
        )
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_settings(kafka_broker: KafkaBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_broker.bootstrap_servers, client_id="pytest")


@pytest.fixture(scope="session")
def triton_server(run_dir: Path):
    repository = run_dir / "model-repository"
    repository.mkdir(parents=True, exist_ok=True)
    server = TritonServer(state_dir=run_dir / "triton", model_repository=repository)
    try:
        server.start()
        _started["triton"] = f"Triton Inference Server pid {server.daemon.pid} at {server.grpc_url}"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton_settings(triton_server: TritonServer) -> TritonSettings:
    return TritonSettings(url=triton_server.grpc_url)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _started:
        terminalreporter.section("real infrastructure used by this run")
        for line in _started.values():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama causal LM with SmolLM2's real tokenizer (a Hugging Face folder)."""
    from tests.support.tiny_models import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT scalar reward model with MiniLM's real tokenizer."""
    from tests.support.tiny_models import tiny_reward_model

    return tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))
