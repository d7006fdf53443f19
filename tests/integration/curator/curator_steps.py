"""Drives a real CuratorWorker (real Kafka, sqlite state) cycle by cycle in a test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from services.common.settings import KafkaSettings
from services.curator.server import CuratorWorker
from services.curator.settings import CuratorSettings


def make_worker(
    kafka: KafkaSettings, state_dir: Path, group_id: str | None = None
) -> CuratorWorker:
    settings = CuratorSettings(
        kafka=kafka,
        state_dir=state_dir,
        metrics_port=0,
        poll_timeout_ms=300,
        group_id=group_id or f"curator-test-{uuid.uuid4().hex[:8]}",
    )
    return CuratorWorker(settings)


def step_until(
    worker: CuratorWorker, done: Callable[[list], bool], timeout_s: float = 60.0
) -> list:
    """Runs cycles until `done(all records produced so far)`; returns those records."""
    produced: list = []
    deadline = time.monotonic() + timeout_s
    while not done(produced):
        if time.monotonic() > deadline:
            raise TimeoutError(f"curator produced {len(produced)} records, not what was awaited")
        produced += worker.step()
    return produced


def step_for(worker: CuratorWorker, seconds: float) -> list:
    produced: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        produced += worker.step()
    return produced
