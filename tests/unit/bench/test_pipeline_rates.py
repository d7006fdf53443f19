"""The pipeline's samples/s (bench/pipeline.py) from the trainer's `update` events, and the
`ratio_vs_trl` headline (bench/trainer_vs_trl.py), are the arithmetic their docstrings promise:
the first update left out of the steady rate as TRL's first step is, best over best."""

from __future__ import annotations

import pytest

from bench.pipeline import pipeline_rates
from bench.trainer_vs_trl import pipeline_summary


def update(end: float, seconds: float, samples: int) -> dict:
    return {
        "event": "update",
        "time/unix": end,
        "time/update_s": seconds,
        "rollout_ids": [f"r{i}" for i in range(samples)],
    }


def test_rates_leave_the_first_update_out_of_the_steady_figure():
    # Started at 1000; updates end at 1100 (took 10 s), 1120, 1150, 1170; 16 samples each.
    events = [update(1100, 10, 16), update(1120, 8, 16), update(1150, 9, 16), update(1170, 7, 16)]
    rates = pipeline_rates(events, started_unix=1000.0)
    assert rates["samples_per_s"] == pytest.approx(48 / 70)
    assert rates["samples_per_s_from_first_update"] == pytest.approx(64 / 80)
    assert rates["samples_per_s_with_startup"] == pytest.approx(64 / 170)
    assert rates["interval_s"] == [20, 30, 20]
    assert rates["startup_to_first_update_s"] == 90
    assert rates["end_to_end_s"] == 170
    assert rates["samples"] == [16, 16, 16, 16]


def test_rates_need_two_updates_in_order():
    with pytest.raises(ValueError, match="at least 2"):
        pipeline_rates([update(1100, 10, 16)], 1000.0)
    with pytest.raises(ValueError, match="not in order"):
        pipeline_rates([update(1100, 10, 16), update(1090, 10, 16)], 1000.0)


def test_ratio_is_best_pipeline_over_best_trl_with_per_round_ratios():
    # TRL's per_run leaves step 0 out: 16 samples over 4 + 4 s (2/s), then over 10 + 6 s (1/s).
    def trl_run(generate_s: float, update_s: float) -> dict:
        warm_up = {"generate_s": 99, "update_s": 99, "samples": 16, "response_tokens": 1}
        step = {"generate_s": generate_s, "update_s": update_s, "samples": 16}
        return {
            "steps": [warm_up, {**step, "response_tokens": 100, "update_cpu_s": 1.0}],
            "peak_rss_mb": 1.0,
            "process_wall_s": 60.0,
        }

    def pipeline_run(rate: float) -> dict:
        return {
            "samples_per_s": rate,
            "samples_per_s_from_first_update": rate,
            "samples_per_s_with_startup": rate / 2,
            "end_to_end_s": 100.0,
        }

    summary = pipeline_summary(
        [trl_run(4, 4), trl_run(10, 6)], [pipeline_run(0.5), pipeline_run(0.8)]
    )
    assert summary["trl_samples_per_s_runs"] == [2.0, 1.0]
    assert summary["trl_samples_per_s"] == 2.0
    assert summary["pipeline_samples_per_s"] == 0.8
    assert summary["ratio_vs_trl"] == pytest.approx(0.4)
    assert summary["ratio_vs_trl_per_repeat"] == pytest.approx([0.25, 0.8])
