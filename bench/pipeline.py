"""Part `pipeline` of bench/trainer_vs_trl.py: the platform's whole RL loop as deployed, on the
work TRL does in the same run, for `ratio_vs_trl`.

The processes are deploy/local/stack.py's, started as `make demo` starts them: Kafka, Triton,
the policy and reference services (SmolLM2-135M in Triton), the reward service scoring with the
bench's rule in process (`RLHF_REWARD_ANNOTATOR`, no model), the trainer (GRPO, the bench's
lr, KL coefficient and seed) and the rollout worker (group size, prompts per call and token
budget of the bench; max_rollouts = batch x steps). Per optimizer step:
  1. the worker asks the policy for a group per prompt, then the reward and the reference
     services (at once), and writes the rollouts to Kafka;
  2. the trainer consumes a batch, updates, and pushes the new weights to the policy beside the
     next update, while the worker already makes the next batch (within max_staleness).

The rate is read from the trainer's metrics log (its `update` events: end time, seconds of the
update, rollouts used), as TRL's is read from its steps: `pipeline_rates` below.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from itertools import pairwise
from pathlib import Path


def pipeline_rates(updates: list[dict], started_unix: float) -> dict:
    """Samples/s of the pipeline from the trainer's `update` events, in order of step.

    - `samples_per_s`: the updates after the first, over the time from the end of the first
      update to the end of the last. The first step is left out as TRL's is (its warm-up, here
      also the wait for the first batch): what remains is the steady loop, every interval one
      batch generated, scored, consumed, trained on and pushed.
    - `samples_per_s_from_first_update`: every update's samples over the time from the start of
      the first update to the end of the last (the first batch's generation falls before it).
    - `samples_per_s_with_startup`: every update's samples over the time from `started_unix`
      (before Kafka and Triton start) to the end of the last update.
    Each event needs `time/unix` (its end), `time/update_s` and `rollout_ids`."""
    if len(updates) < 2:
        raise ValueError(f"need at least 2 updates for a rate, got {len(updates)}")
    ends = [u["time/unix"] for u in updates]
    if any(b < a for a, b in pairwise(ends)):
        raise ValueError("updates are not in order of their end times")
    samples = [len(u["rollout_ids"]) for u in updates]
    first_start = ends[0] - updates[0]["time/update_s"]
    return {
        "samples_per_s": sum(samples[1:]) / (ends[-1] - ends[0]),
        "samples_per_s_from_first_update": sum(samples) / (ends[-1] - first_start),
        "samples_per_s_with_startup": sum(samples) / (ends[-1] - started_unix),
        "samples": samples,
        "update_s": [u["time/update_s"] for u in updates],
        "interval_s": [b - a for a, b in pairwise(ends)],
        "startup_to_first_update_s": first_start - started_unix,
        "end_to_end_s": ends[-1] - started_unix,
    }


def read_events(metrics_log: Path, event: str) -> list[dict]:
    if not metrics_log.exists():
        return []
    lines = metrics_log.read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("event") == event]


def run_pipeline(config, threads: int, staleness: int, timeout_s: float = 1500) -> dict:
    """One run of the deployed loop on `config`'s work (bench.trainer_vs_trl.BenchConfig);
    every process is stopped before it returns. The state folder is removed unless the run
    fails (its logs say why)."""
    from bench.trainer_vs_trl import load_prompts
    from deploy.local.stack import Stack, wait_for

    model = Path(config.model_dir)
    batch = config.prompts_per_step * config.group_size
    state = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    started_unix = time.time()
    stack = Stack(state / "stack", dtype="float32", threads=threads)
    try:
        stack.start_core()
        stack.start_policy(model)
        stack.start_reward(None, annotator=config.reward_rule)
        stack.start_reference(model)
        stack.wait_serving(("policy", "reward", "reference"))
        serving_unix = time.time()
        learner = {"seed": config.seed, "lr": config.lr, "kl_coef": config.beta}
        stack.start_trainer(model, "grpo", batch, config.steps, learner)
        # The prompts TRL trains on, as chat messages (the reward service renders a single
        # user turn as its content: the string TRL's reward function gets).
        prompts = load_prompts(config.prompts)[: config.prompts_per_step * config.steps]
        dataset = state / "prompts.jsonl"
        dataset.write_text(
            "".join(
                json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in prompts
            )
        )
        stack.start_rollout(
            dataset,
            config.group_size,
            config.prompts_per_step,
            config.max_new_tokens,
            batch * config.steps,
            seed=config.seed,
            max_staleness=staleness,
            # The worker counts the trainer's uncommitted backlog in versions of this many
            # rollouts: left at its default (8) under a batch of 16, one batch in training
            # reads as 2 versions ahead and max_staleness 1 never lets the next batch start.
            rollouts_per_version=batch,
        )
        trainer = stack.daemons["trainer"]
        wait_for(lambda: trainer.pid is None, timeout_s, 1.0, "the trainer's last update")
        exited_unix = time.time()
        metrics_log = stack.state / "trainer" / "metrics.jsonl"
        updates = read_events(metrics_log, "update")
        if len(updates) < config.steps:
            raise RuntimeError(
                f"the trainer stopped after {len(updates)} of {config.steps} updates; see "
                f"{trainer.log_file}"
            )
        publishes = read_events(metrics_log, "publish")
    except BaseException:
        stack.stop()
        print(f"pipeline run failed; its state and logs are in {state}", flush=True)
        raise
    stack.stop()
    shutil.rmtree(state, ignore_errors=True)
    rates = pipeline_rates(updates, started_unix)
    return {
        **rates,
        "services_serving_s": serving_unix - started_unix,
        "trainer_exit_s": exited_unix - started_unix,
        "push_s": [p["time/push_s"] for p in publishes],
        "pushes_accepted": sum(all(r["accepted"] for r in p["replicas"]) for p in publishes),
        "staleness_mean": [u.get("staleness/mean") for u in updates],
        "reward_mean": [u.get("reward/mean") for u in updates],
        "response_tokens_mean": [u.get("response/length_mean") for u in updates],
    }
