"""The Kafka topics of the platform, with the partition counts and configs the design needs.

`rlhf.generations.v1` and `rlhf.feedback.v1` are both keyed by response id and have the same
partition count, so the curator's join of the two is partition-local.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENERATIONS = "rlhf.generations.v1"
FEEDBACK = "rlhf.feedback.v1"
PREFERENCES = "rlhf.preferences.v1"
ROLLOUTS = "rlhf.rollouts.v1"
WEIGHTS = "rlhf.weights.v1"
ANNOTATION_QUEUE = "rlhf.annotation-queue.v1"

# Co-partitioned pair: must stay equal.
JOIN_PARTITIONS = 6


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    """Number of partitions; the unit of consumer parallelism."""
    configs: dict[str, str] = field(default_factory=dict)
    """Topic-level configs passed at creation."""


DLQ_SUFFIX = ".dlq"
DLQ_RETENTION_MS = str(30 * 24 * 3600 * 1000)


def dlq_topic(topic: str) -> str:
    """Where the records of `topic` that a consumer cannot use go (services/common/dead_letters)."""
    return f"{topic}{DLQ_SUFFIX}"


_DATA: tuple[TopicSpec, ...] = (
    TopicSpec(GENERATIONS, JOIN_PARTITIONS, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    TopicSpec(FEEDBACK, JOIN_PARTITIONS, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    TopicSpec(PREFERENCES, 3, {"retention.ms": "-1"}),
    TopicSpec(ROLLOUTS, 4, {"retention.ms": str(3 * 24 * 3600 * 1000)}),
    # Keyed by model name; compaction keeps the latest version of each model forever.
    TopicSpec(WEIGHTS, 1, {"cleanup.policy": "compact"}),
    # Keyed by candidate id; what the reward model is least sure of, for people to rank.
    TopicSpec(ANNOTATION_QUEUE, 1, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
)

# Every consumed topic has its dead-letter topic: one partition (dead letters are rare, and a
# person reads them in order), kept 30 days.
TOPICS: tuple[TopicSpec, ...] = _DATA + tuple(
    TopicSpec(dlq_topic(t.name), 1, {"retention.ms": DLQ_RETENTION_MS}) for t in _DATA
)
