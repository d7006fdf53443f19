"""The fault-injection scenarios behind `make chaos` (bench/chaos.py) and its short version in
`make test` (tests/integration/chaos/). Each scenario is a function `run(env, **sizes) -> Row`
that starts real processes on `env`'s real Kafka broker and Triton server, injects its fault,
and counts every figure itself: from Kafka (records found by id) and from the services' own
records (the trainer's metrics log, Prometheus registries, health checks, logs).

A row's `failures` lists every promise the run saw broken, in words; a clean run has none.
`lost` and `duplicated` count events that were acknowledged and then missing or present twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.local.kafka import KafkaBroker
from deploy.local.triton import TritonServer
from services.common.settings import KafkaSettings


@dataclass
class ChaosEnv:
    """What every scenario runs on."""

    broker: KafkaBroker
    kafka: KafkaSettings
    triton: TritonServer
    lm_dir: Path
    """A tiny causal LM (policy, reference and trainer start from it)."""
    rm_dir: Path
    """A tiny scalar reward model (the refresh fine-tunes it)."""
    work: Path
    """A folder of this run's own; each scenario makes a subfolder."""
    private_topics: bool = True
    """Rollouts and preferences on private topics (a test session's broker holds other tests'
    records on the real ones); the bench's own broker uses the real topic names."""

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Row:
    """One fault's line of the table."""

    fault: str
    injected: int = 0
    acknowledged: int = 0
    found: int = 0
    lost: int = 0
    duplicated: int = 0
    requests_failed: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, acknowledged: Iterable[str], found: Iterable[str]) -> None:
        """Adds acknowledged event ids and the ids found afterwards (a list: repeats count)."""
        acked = set(acknowledged)
        seen = Counter(i for i in found if i in acked)
        self.acknowledged += len(acked)
        self.found += len(seen)
        self.lost += len(acked - set(seen))
        self.duplicated += sum(n - 1 for n in seen.values())

    def check(self, ok: bool, promise: str) -> bool:
        if not ok:
            self.failures.append(promise)
        return ok

    @property
    def passed(self) -> bool:
        return not self.failures and not self.lost and not self.duplicated

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    """True once `predicate()` holds, False at the timeout (the caller records the failure)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | injected | acknowledged | found | lost | duplicated | requests failed | passed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.fault} | {r.injected} | {r.acknowledged} | {r.found} | {r.lost} "
            f"| {r.duplicated} | {r.requests_failed} | {'yes' if r.passed else 'NO'} |"
        )
    return "\n".join(lines)
