"""Benchmark: feedback ingestion through the gateway with acks=all, against a no-op endpoint of
the same FastAPI server in the same run, and the count of acknowledged events lost.

    python bench/feedback_ingest.py [--duration 5] [--connections 1,2,4,8,16,32]

1. starts a fresh Kafka broker (KRaft) and the real gateway (uvicorn, one process) with the
   benchmark's no-op endpoint on: POST /v1/bench/noop does the same auth, rate-limit check and
   body validation as POST /v1/feedback, but writes nothing;
2. for each connection count, runs `wrk` (one thread, closed loop) against each endpoint and
   reads requests/s and p99 latency; an endpoint's figure is its best requests/s at p99 < 50 ms;
3. counts the FeedbackEvents in Kafka and compares with the 202 answers wrk saw: `lost` is
   202-acknowledged events missing from Kafka (goal 0).
Writes bench/results/feedback_ingest.json (`ratio_vs_noop`, `lost`, and the raw figures).
Needs `wrk` (apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import RESULTS, write_result
from deploy.local.kafka import KafkaBroker
from services.common import topics
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import read_topic, running_gateway

P99_BUDGET_MS = 50.0

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"response_id": "%(rid)s", "thumb": "up", "categories": ["bench"]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
accepted = 0
other = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, o = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("accepted"); o = o + t:get("other") end
  io.write(string.format("STATUS accepted=%%d other=%%d\\n", a, o))
end
"""


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, script: Path, connections: int, duration_s: int) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    status = re.search(r"STATUS accepted=(\d+) other=(\d+)", out)
    return {
        "connections": connections,
        "requests_per_s": rps,
        "p50_ms": _ms(*p50.groups()),
        "p99_ms": _ms(*p99.groups()),
        "accepted": int(status.group(1)),
        "other": int(status.group(2)),
    }


def best_under_budget(runs: list[dict]) -> float:
    ok = [r["requests_per_s"] for r in runs if r["p99_ms"] < P99_BUDGET_MS and r["other"] == 0]
    return max(ok, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="Seconds per wrk run.")
    parser.add_argument("--connections", default="1,2,4,8,16,32", help="Connection counts to try.")
    parser.add_argument("--out", type=Path, default=RESULTS / "feedback_ingest.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    connections = [int(c) for c in args.connections.split(",")]

    work = Path(tempfile.mkdtemp(prefix="feedback-bench-", dir=REPO / ".local"))
    broker = KafkaBroker(state_dir=work / "kafka")
    broker.start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="bench")
    marker = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        with running_gateway(
            kafka,
            work,
            bench_noop_endpoint="true",
            rate_limit_per_s=1e9,
            rate_limit_burst=1_000_000_000,
            idempotency_cache_size=0,
            log_level="WARNING",
        ) as gw:
            script = work / "post.lua"
            script.write_text(WRK_SCRIPT % {"rid": marker, "key": gw.api_key})
            run_wrk(f"{gw.url}/v1/feedback", script, 4, 2)  # warm-up (connections, metadata)
            warmup_count = len(_stored(kafka, marker))
            noop, feedback = [], []
            for c in connections:  # interleaved so that machine noise hits both alike
                noop.append(run_wrk(f"{gw.url}/v1/bench/noop", script, c, args.duration))
                feedback.append(run_wrk(f"{gw.url}/v1/feedback", script, c, args.duration))
                print(
                    f"c={c:3d}  noop {noop[-1]['requests_per_s']:8.0f}/s p99 {noop[-1]['p99_ms']:6.1f} ms"
                    f"   feedback {feedback[-1]['requests_per_s']:8.0f}/s p99 {feedback[-1]['p99_ms']:6.1f} ms",
                    flush=True,
                )
        acked = sum(r["accepted"] for r in feedback)
        stored = len(_stored(kafka, marker)) - warmup_count
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    noop_best, feedback_best = best_under_budget(noop), best_under_budget(feedback)
    result = {
        "benchmark": "feedback_ingest",
        "p99_budget_ms": P99_BUDGET_MS,
        "feedback_requests_per_s_at_p99_budget": feedback_best,
        "noop_requests_per_s_at_p99_budget": noop_best,
        "ratio_vs_noop": round(feedback_best / noop_best, 3) if noop_best else 0.0,
        "acknowledged": acked,
        "stored_in_kafka": stored,
        "lost": max(0, acked - stored),
        "feedback_runs": feedback,
        "noop_runs": noop,
        "load_generator": "wrk -t1 (closed loop), one uvicorn process, acks=all idempotent producer",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result("feedback_ingest", result, args.out)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_runs")}, indent=2))


def _stored(kafka: KafkaSettings, marker: str) -> set[str]:
    events = read_topic(kafka, topics.FEEDBACK, events_pb2.FeedbackEvent, timeout_s=300)
    return {e.feedback_id for e in events if e.response_id == marker}


if __name__ == "__main__":
    main()
