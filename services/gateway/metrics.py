"""The gateway's Prometheus metrics (`rlhf_gateway_*`) and the ASGI middleware that counts
requests by route and status. Route labels are the fixed paths of the API, never ids."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "rlhf_gateway_requests_total",
            "HTTP requests, by route and status code.",
            ["route", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "rlhf_gateway_request_duration_seconds",
            "HTTP request latency, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.events_accepted = Counter(
            "rlhf_gateway_events_accepted_total",
            "Events Kafka acknowledged, by kind.",
            ["kind"],
            registry=registry,
        )
        self.events_duplicate = Counter(
            "rlhf_gateway_events_duplicate_total",
            "Events answered from the idempotency cache.",
            ["kind"],
            registry=registry,
        )
        self.events_unavailable = Counter(
            "rlhf_gateway_events_unavailable_total",
            "Events answered 503: Kafka did not acknowledge.",
            ["kind"],
            registry=registry,
        )
        self.feedback = Counter(
            "rlhf_gateway_feedback_total",
            "Feedback events Kafka acknowledged, by rating: up, down, or 1-5 (duplicates of an "
            "idempotency key not counted).",
            ["rating"],
            registry=registry,
        )
        for rating in ("up", "down", "1", "2", "3", "4", "5"):
            self.feedback.labels(rating)  # every series exists from the start, at 0
        self.rate_limited = Counter(
            "rlhf_gateway_rate_limited_total", "Requests refused with 429.", registry=registry
        )


class MetricsMiddleware:
    """Pure ASGI (no per-request task or body copy): cheap enough for the ingest path."""

    def __init__(self, app, metrics: GatewayMetrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        start = time.perf_counter()
        code = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(code[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
