"""Runs every benchmark module in bench/ (each writes bench/results/<name>.json) and prints a
markdown table of the headline ratios against their goals.

    python -m bench.run [name ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.memory import process_sampler

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# name -> (headline key, goal, "min" when higher is better / "max" when lower is better, what)
HEADLINES: dict[str, list[tuple[str, float, str, str]]] = {
    "generation": [
        ("ratio_vs_inprocess", 0.95, "min", "service tokens/s at batch 8 / in-process generate"),
        ("batching_gain_16", 4.0, "min", "16 concurrent clients / same clients one at a time"),
        ("poisson_throughput_ratio", 1.5, "min", "Poisson 2x load tokens/s, continuous / static"),
        ("ttft_p99_ratio", 3.0, "max", "p99 time to first token at 1x load / idle request's"),
        ("lone_request_ratio", 1.10, "max", "lone request gRPC + Triton / in-process generate"),
        ("n8_prefill_gain", 1.5, "min", "8 samples of a 200-token prompt, unshared / shared"),
    ],
    "weight_swap": [
        ("ratio_vs_raw_copy", 2.0, "max", "push+verify+swap time / raw loopback TCP copy"),
        ("ratio_vs_gloo_broadcast", 1.5, "max", "push+verify+swap time / gloo broadcast"),
        ("training_overhead_with_push", 0.05, "max", "1 - trainer samples/s pushing / not"),
    ],
    "rollout_throughput": [
        ("ratio_vs_in_process", 0.8, "min", "rollouts/s through Kafka / same loop in one process")
    ],
    "feedback_ingest": [
        ("ratio_vs_noop", 0.5, "min", "feedback req/s (acks=all, p99<50ms) / no-op endpoint"),
        ("lost", 0, "max", "acknowledged feedback events missing from Kafka"),
    ],
    "soak": [
        ("errors", 0, "max", "chat completions not answered 200 in the soak (gateway + policy)"),
        ("rss_growth_pct_max", 10.0, "max", "largest RSS growth of gateway/policy/Triton, %"),
    ],
    "trainer_vs_trl": [
        ("learner_ratio_vs_trl", 1.0, "min", "TRL GRPO update s/sample / our learner's"),
        ("ratio_vs_trl", 1.0, "min", "deployed pipeline samples/s / TRL GRPOTrainer's"),
        ("overlap_gain", 1.0, "min", "samples/s, next batch beside the update / alternating"),
        ("ppo_vs_trl", 1.0, "min", "TRL PPO update s/sample / ours (where TRL ships PPO)"),
    ],
}


if __name__ != "__main__":
    # A benchmark imports this module before it starts anything, so the sampler sees every
    # process it starts; the `python -m bench.run` driver itself has nothing to report.
    process_sampler()


def write_result(name: str, result: dict, path: Path | None = None) -> Path:
    """Writes a benchmark's result where `table` reads it (bench/results/<name>.json by default),
    with `peak_rss_mb`: {role: MB} of this process and every process it started (bench.memory).
    A benchmark's own `peak_rss_mb` of that shape (peaks of processes outside this tree, e.g.
    steps a script ran beside it) is merged in; one of another shape is kept, as
    `peak_rss_mb_bench`."""
    sampler = process_sampler()
    result = dict(result)
    peaks, own = sampler.peaks_mb(), result.pop("peak_rss_mb", None)
    if isinstance(own, dict) and all(isinstance(v, int | float) for v in own.values()):
        peaks = {role: max(own.get(role, 0), peaks.get(role, 0)) for role in {**own, **peaks}}
        peaks = dict(sorted(peaks.items(), key=lambda item: -item[1]))
    elif own is not None:
        result["peak_rss_mb_bench"] = own
    result["peak_rss_mb"] = peaks
    result["peak_rss_sampling"] = sampler.summary()
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def run(names: list[str]) -> int:
    failed = 0
    for name in names:
        script = BENCH / f"{name}.py"
        if not script.exists():
            print(f"-- {name}: no bench/{name}.py", file=sys.stderr)
            continue
        print(f">> bench {name}", flush=True)
        failed += subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0
    return failed


def table() -> str:
    rows = ["| benchmark | figure | measured | goal | met |", "| --- | --- | --- | --- | --- |"]
    for name, headlines in HEADLINES.items():
        path = RESULTS / f"{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        for key, goal, sense, what in headlines:
            value = result.get(key)
            if value is None:
                rows.append(
                    f"| {name} | {what} | not run | {'>=' if sense == 'min' else '<='} {goal} | - |"
                )
                continue
            met = value >= goal if sense == "min" else value <= goal
            rows.append(
                f"| {name} | {what} | {value:.3g} | {'>=' if sense == 'min' else '<='} {goal} | {'yes' if met else 'no'} |"
            )
    return "\n".join(rows)


def main() -> int:
    names = sys.argv[1:] or list(HEADLINES)
    failed = run(names)
    print(table())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
