"""Prometheus metrics, named `rlhf_<service>_<thing>_<unit>`: counters end in `_total`,
latencies are histograms in seconds, and no label ever holds a user id or a prompt.

Each service builds its metrics on its own `CollectorRegistry` (so tests can run several services
in one process) and serves them with `serve_metrics`, which adds the process's Kafka consumer lag
(`rlhf_kafka_consumer_lag`, services/common/consumer_lag.py) to what it serves.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.consumer_lag import LAG

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class RpcMetrics:
    """Request count by method and status code, latency by method, in-flight gauge."""

    def __init__(self, service: str, registry: CollectorRegistry):
        prefix = f"rlhf_{service}"
        self.requests = Counter(
            f"{prefix}_requests_total",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            f"{prefix}_request_duration_seconds",
            "RPC latency, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_requests_in_flight", "RPCs being handled now.", registry=registry
        )


_WITH_LAG: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


def add_consumer_lag(registry: CollectorRegistry) -> CollectorRegistry:
    """Registers the process's consumer-lag table on `registry` (once)."""
    if registry not in _WITH_LAG:
        registry.register(LAG)
        _WITH_LAG.add(registry)
    return registry


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Starts the /metrics HTTP endpoint in a daemon thread, with the consumer lag; returns
    (server, thread)."""
    return start_http_server(port, addr=addr, registry=add_consumer_lag(registry))
