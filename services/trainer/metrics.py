"""What the trainer reports: Prometheus metrics (`rlhf_trainer_*`) and a local JSONL log the
demo plots and the crash test audits.

The log has one line per update: `{"event": "update", "step", "weights_version", "rollout_ids",
metrics...}`. A restarted trainer first writes `{"event": "resume", "step": k}`: updates after
step k that the crash undid are void, and `effective_updates` reads the log that way.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)

# Learner metric keys reported as named gauges (the rest still go to the JSONL log).
LEARNER_GAUGES = {
    "reward/mean": ("reward_mean", "Mean reward-model score of the last batch."),
    "kl/behaviour_ref_k1": (
        "kl",
        "Mean sequence KL (k1) of the behaviour policy to the reference.",
    ),
    "policy/entropy": ("entropy", "Mean per-token policy entropy in the last batch."),
    "policy/clipfrac": ("clip_fraction", "Fraction of tokens whose ratio was clipped."),
    "value/loss": ("value_loss", "Critic loss of the last update (PPO)."),
    "advantages/mean": ("advantages_mean", "Mean advantage of the last batch."),
    "advantages/abs_mean": ("advantages_abs_mean", "Mean absolute advantage of the last batch."),
    "kl/coef": ("kl_coef", "Current KL coefficient beta."),
    # The reward-hacking watch (services/trainer/algorithms/guards.py): the reward model's mean
    # beside the gold annotator's, the ensemble's disagreement, and what length buys.
    "gold/mean": (
        "gold_mean",
        "Mean gold-annotator score of the last batch (rollouts with gold_score only).",
    ),
    "reward/spread_mean": (
        "reward_spread_mean",
        "Mean reward-ensemble spread (disagreement) of the last batch; 0 with one head.",
    ),
    "reward/shaped_mean": (
        "reward_shaped_mean",
        "Mean reward after the uncertainty penalty and length control: what was optimised.",
    ),
    "reward/length_corr": (
        "length_reward_correlation",
        "Pearson correlation of response length and reward-model score in the last batch.",
    ),
    "response/length_mean": ("response_length_tokens", "Mean response length in the last batch."),
    "kl/policy_ref": (
        "kl_policy_ref_per_token",
        "Per-token KL of the policy to the reference after the last update (with a KL budget).",
    ),
}


class TrainerMetrics:
    """The trainer's Prometheus metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.updates = Counter("rlhf_trainer_updates_total", "RL updates done.", registry=r)
        self.consumed = Counter(
            "rlhf_trainer_rollouts_consumed_total", "Rollouts used in an update.", registry=r
        )
        self.dropped = Counter(
            "rlhf_trainer_rollouts_dropped_total",
            "Rollouts not used, by reason.",
            ["reason"],
            registry=r,
        )
        self.step_time = Histogram(
            "rlhf_trainer_step_duration_seconds",
            "Time of one RL update.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.staleness = Histogram(
            "rlhf_trainer_rollout_staleness_versions", "Trainer version minus the rollout's version.",
            buckets=STALENESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.version = Gauge(
            "rlhf_trainer_weights_version", "Weights version the trainer holds.", registry=r
        )
        self.checkpoint_copy_time = Histogram(
            "rlhf_trainer_checkpoint_copy_seconds",
            "Training-path time of a background checkpoint: the state's copy, and any wait for "
            "the previous write.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.push_time = Histogram(
            "rlhf_trainer_weights_push_duration_seconds", "Time to push one version to all replicas.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.push_failures = Counter(
            "rlhf_trainer_weights_push_failures_total",
            "Replica pushes refused or failed.",
            registry=r,
        )
        self.kl_budget_skips = Counter(
            "rlhf_trainer_kl_budget_skips_total",
            "Updates undone because they would have pushed the policy over the KL budget.",
            registry=r,
        )
        self.learner = {
            key: Gauge(f"rlhf_trainer_{name}", doc, registry=r)
            for key, (name, doc) in LEARNER_GAUGES.items()
        }

    def observe_update(
        self, learner_metrics: dict[str, float], staleness: list[int], seconds: float
    ) -> None:
        self.updates.inc()
        self.consumed.inc(len(staleness))
        self.step_time.observe(seconds)
        for s in staleness:
            self.staleness.observe(s)
        if learner_metrics.get("guard/kl_budget_skipped"):
            self.kl_budget_skips.inc()
        for key, gauge in self.learner.items():
            if key in learner_metrics:
                gauge.set(learner_metrics[key])


def metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


class MetricsLog:
    """Append-only JSONL; each line is flushed and fsynced so a crash loses at most the last."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - appended to until close()
        # A line torn by a crash must not glue onto the next one.
        if self._file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_log(path: Path) -> list[dict]:
    """Every parseable line (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def effective_updates(records: list[dict]) -> list[dict]:
    """The updates that count: a `resume` at step k voids the logged updates after step k."""
    updates: dict[int, dict] = {}
    for record in records:
        if record.get("event") == "resume":
            for step in [s for s in updates if s > record["step"]]:
                del updates[step]
        elif record.get("event") == "update":
            updates[record["step"]] = record
    return [updates[s] for s in sorted(updates)]
