"""The policy's own Prometheus metrics (RPC counts and latencies come from ModelServer)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BATCH_BUCKETS


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.generated_tokens = Counter(
            "rlhf_policy_generated_tokens_total", "Tokens returned to clients.", registry=registry
        )
        self.batch_size = Histogram(
            "rlhf_policy_batch_size",
            "Sequences Triton generated together, observed per sequence.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "rlhf_policy_queue_depth",
            "Sequences admitted to Triton and not finished.",
            registry=registry,
        )
        self.admission_waiting = Gauge(
            "rlhf_policy_admission_waiting_sequences",
            "Sequences waiting for admission (admission=queue), not yet sent to Triton.",
            registry=registry,
        )
        self.kv_tokens = Gauge(
            "rlhf_policy_kv_reserved_tokens",
            "KV-cache tokens reserved by admitted sequences (prompt + max_new_tokens each).",
            registry=registry,
        )
        self.weights_version = Gauge(
            "rlhf_policy_weights_version", "Weights version served now.", registry=registry
        )
        self.weights_updates = Counter(
            "rlhf_policy_weights_updates_total",
            "Weight updates by source and result.",
            ["source", "result"],
            registry=registry,
        )
        self.generation_log_errors = Counter(
            "rlhf_policy_generation_log_errors_total",
            "Generations Kafka did not acknowledge.",
            registry=registry,
        )
