"""`make chaos`: the fault-injection suite. Starts its own Kafka broker (KRaft) and Triton server
under `.local/chaos/`, builds tiny random models, runs every fault of bench/chaos_scenarios with
the long sizes, prints one table row per fault and writes `bench/results/chaos.json` (totals
under `lost` and `duplicated`). Exits non-zero when any row did not pass.

    python -m bench.chaos                  # every fault, long sizes (7-8 min on 2 cores)
    python -m bench.chaos --short          # one injection each (what `make test` runs)
    python -m bench.chaos trainer_kill     # some faults by name

Every figure is counted from Kafka and from the services' own records; see the scenarios'
docstrings for what each one injects and checks.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import time
import traceback
from pathlib import Path

# The control plane's token for the services this run starts (they and their callers read it).
os.environ.setdefault("RLHF_CONTROL_TOKEN", secrets.token_urlsafe(24))

from bench.chaos_scenarios import ChaosEnv, Row, table
from bench.chaos_scenarios.broker import broker_outage
from bench.chaos_scenarios.poison import poison_records
from bench.chaos_scenarios.policy import bad_weights, replica_kill
from bench.chaos_scenarios.trainer import checkpoint_full, trainer_kill
from bench.chaos_scenarios.triton import triton_kill
from bench.run import write_result

REPO = Path(__file__).resolve().parent.parent

# name -> (scenario, long sizes, short sizes)
SCENARIOS = {
    "trainer_kill": (trainer_kill, {"kills": 10}, {"kills": 1}),
    "broker_outage": (broker_outage, {"outage_s": 20.0}, {"outage_s": 6.0}),
    "replica_kill": (replica_kill, {"kills": 2}, {"kills": 1}),
    "triton_kill": (triton_kill, {"kills": 2}, {"kills": 1}),
    "bad_weights": (bad_weights, {"rounds": 3}, {"rounds": 1}),
    "checkpoint_full": (checkpoint_full, {"groups": 16}, {"groups": 8}),
    "poison_records": (poison_records, {"per_topic": 3}, {"per_topic": 1}),
}


def start_env(work: Path) -> ChaosEnv:
    from deploy.local.kafka import KafkaBroker
    from deploy.local.triton import TritonServer
    from services.common.settings import KafkaSettings
    from tests.support.tiny_models import tiny_causal_lm, tiny_reward_model

    broker = KafkaBroker(state_dir=work / "kafka")
    broker.start()
    triton = TritonServer(state_dir=work / "triton", model_repository=work / "model-repository")
    triton.model_repository.mkdir(parents=True, exist_ok=True)
    triton.start()
    return ChaosEnv(
        broker=broker,
        kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="chaos"),
        triton=triton,
        lm_dir=tiny_causal_lm(work / "tiny-lm"),
        rm_dir=tiny_reward_model(work / "tiny-rm"),
        work=work / "scenarios",
        private_topics=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"faults to run (of {', '.join(SCENARIOS)})")
    parser.add_argument("--short", action="store_true", help="one injection of each fault")
    args = parser.parse_args()
    names = args.names or list(SCENARIOS)
    if unknown := set(names) - set(SCENARIOS):
        parser.error(f"no such fault: {', '.join(sorted(unknown))}")
    work = REPO / ".local" / "chaos" / f"{os.getpid()}-{int(time.time())}"
    started = time.monotonic()
    env = start_env(work)
    rows: list[Row] = []
    try:
        for name in names:
            scenario, long_sizes, short_sizes = SCENARIOS[name]
            print(f">> chaos {name}", flush=True)
            clock = time.monotonic()
            try:
                row = scenario(env, **(short_sizes if args.short else long_sizes))
            except Exception:  # noqa: BLE001 - a broken scenario is a failed row, not a crash
                row = Row(name, failures=[f"the scenario raised: {traceback.format_exc()[-800:]}"])
            row.seconds = round(time.monotonic() - clock, 1)
            rows.append(row)
            print(f"   {row.as_dict()}", flush=True)
    finally:
        env.triton.stop()
        env.broker.stop()
    print(table(rows))
    result = {
        "version": "short" if args.short else "long",
        "lost": sum(r.lost for r in rows),
        "duplicated": sum(r.duplicated for r in rows),
        "injected": sum(r.injected for r in rows),
        "acknowledged": sum(r.acknowledged for r in rows),
        "requests_failed": sum(r.requests_failed for r in rows),
        "passed": all(r.passed for r in rows),
        "seconds": round(time.monotonic() - started, 1),
        "faults": [r.as_dict() for r in rows],
    }
    if not args.names and not args.short:  # the committed result is the full, long run
        print(f"wrote {write_result('chaos', result)}")
    if result["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs of the failed run kept under {work}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
