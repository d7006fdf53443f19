"""The loop and the entry point the Kafka-consuming workers share (curator, reward refresh).

A worker has `stopping` (an Event), `step()` (one poll-and-process cycle whose effects are
durable before its offsets are committed) and `close()`. `run_cycles` calls `step` until
`stopping` is set; a failed cycle is logged and retried after a pause, from the stored offsets.
`serve` is a worker process's `main`: logging, metrics, SIGTERM/SIGINT, run, close.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from services.common.consumer_lag import LAG
from services.common.logging import configure_logging
from services.common.metrics import serve_metrics

log = logging.getLogger(__name__)


class Worker(Protocol):
    stopping: threading.Event

    def step(self) -> Any: ...

    def run(self) -> None: ...

    def close(self) -> None: ...


def run_cycles(worker: Worker, name: str, pause_s: float = 1.0) -> None:
    while not worker.stopping.is_set():
        try:
            worker.step()
        except Exception:
            log.exception("%s cycle failed; retrying from the stored offsets", name)
            time.sleep(pause_s)
        # A worker that commits nothing (failing cycles) still shows its lag growing.
        LAG.refresh(getattr(worker, "consumer", None))


def serve(
    name: str, settings: Any, make_worker: Callable[[Any, CollectorRegistry], Worker]
) -> None:
    """Runs one worker until SIGTERM/SIGINT; `settings` carries log_level, metrics_port, state_dir."""
    configure_logging(name, settings.log_level)
    registry = CollectorRegistry()
    if settings.metrics_port:
        serve_metrics(registry, settings.metrics_port)
    worker = make_worker(settings, registry)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    log.info(f"{name} started", extra={"fields": {"state_dir": str(settings.state_dir)}})
    try:
        worker.run()
    finally:
        worker.close()
