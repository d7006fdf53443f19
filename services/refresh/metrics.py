"""The refresh's Prometheus metrics (`rlhf_refresh_*`), and the per-cohort gauges that each
refresh sets from its report (see worker.py step 4b)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RefreshMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.records = Counter(
            "rlhf_refresh_records_consumed_total",
            "Preference records read, by what became of them (pair, label, duplicate, invalid).",
            ["kind"],
            registry=registry,
        )
        self.pairs = Counter(
            "rlhf_refresh_pairs_consumed_total",
            "New pairs stored, by split.",
            ["split"],
            registry=registry,
        )
        self.runs = Counter("rlhf_refresh_refreshes_run_total", "Refreshes run.", registry=registry)
        self.published = Counter(
            "rlhf_refresh_refreshes_published_total",
            "Refreshes whose model was published.",
            registry=registry,
        )
        self.rejected = Counter(
            "rlhf_refresh_refreshes_rejected_total",
            "Refreshes dropped: held-out accuracy fell.",
            registry=registry,
        )
        self.reloads = Counter(
            "rlhf_refresh_reloads_total",
            "ReloadModel outcomes, by result (accepted, refused, unreachable).",
            ["result"],
            registry=registry,
        )
        self.accuracy = Gauge(
            "rlhf_refresh_held_out_accuracy",
            "Held-out pairwise accuracy of the current and the last candidate model.",
            ["model"],
            registry=registry,
        )
        self.version = Gauge(
            "rlhf_refresh_reward_model_version",
            "Version of the last published reward model.",
            registry=registry,
        )
        self.cohort_accuracy = Gauge(
            "rlhf_refresh_cohort_accuracy",
            "Held-out pairwise accuracy of the last candidate model on each annotator cohort's pairs.",
            ["cohort"],
            registry=registry,
        )
        self.cohort_pairs = Gauge(
            "rlhf_refresh_cohort_pairs",
            "Held-out pairs of each annotator cohort in the last refresh.",
            ["cohort"],
            registry=registry,
        )
        self.cohort_train_share = Gauge(
            "rlhf_refresh_cohort_train_share",
            "Share of the last refresh's training pairs labelled by each annotator cohort.",
            ["cohort"],
            registry=registry,
        )
        self.inter_cohort_agreement = Gauge(
            "rlhf_refresh_inter_cohort_agreement",
            "Share of label pairs from two human cohorts on the same comparison that agree.",
            registry=registry,
        )
        self.ai_human_agreement = Gauge(
            "rlhf_refresh_ai_human_agreement",
            "Share of (AI label, human label) pairs on the same comparison that agree.",
            registry=registry,
        )
        self.duration = Histogram(
            "rlhf_refresh_duration_seconds",
            "Time of one refresh.",
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=registry,
        )


def report_cohorts(
    metrics: RefreshMetrics, cohorts: dict[str, dict], agreement: dict[str, dict]
) -> None:
    """The last refresh's per-cohort figures and agreements as gauges (a cohort absent from it
    disappears; an agreement with nothing to compare is NaN, not a misleading 0)."""
    for gauge in (metrics.cohort_accuracy, metrics.cohort_pairs, metrics.cohort_train_share):
        gauge.clear()
    for cohort, figures in cohorts.items():
        metrics.cohort_pairs.labels(cohort).set(figures["held_out_pairs"])
        metrics.cohort_train_share.labels(cohort).set(figures["train_share"])
        if figures["accuracy"] is not None:
            metrics.cohort_accuracy.labels(cohort).set(figures["accuracy"])
    for key, gauge in (
        ("inter_cohort", metrics.inter_cohort_agreement),
        ("ai_human", metrics.ai_human_agreement),
    ):
        share = agreement[key]["share"]
        gauge.set(float("nan") if share is None else share)
