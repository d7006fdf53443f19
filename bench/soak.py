"""Benchmark: a bounded soak of the gateway and the policy, on loopback only.

    python -m bench.soak [--duration 180] [--clients 8] [--max-tokens 16]

1. starts the platform's own processes (deploy/local/stack.py, as `make up` does): Kafka, Triton,
   the policy serving SmolLM2-135M-Instruct and the gateway;
2. `--clients` threads chat through the gateway's /v1/chat/completions without pause (closed
   loop) for a warm-up, then for `--duration` seconds; every answer's status and latency is kept;
3. reads the resident memory (VmRSS) of the gateway, policy and Triton processes, each with its
   descendants (the model runs in Triton's Python stub processes), after the warm-up and at the
   end.

Writes bench/results/soak.json: requests, throughput, p50/p99 latency, errors (any answer other
than 200), and each process's RSS at the start and end. The stated bound: no process grows by
more than `RSS_GROWTH_BOUND_PCT` of its post-warm-up RSS over the run (`rss_growth_pct_max`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import write_result
from bench.workers import Workers
from deploy.local.stack import Stack
from services.common.models import convert_smollm2

RSS_GROWTH_BOUND_PCT = 10.0
PROCESSES = ("gateway", "policy", "triton")
QUESTIONS = [
    "What is a reward model?",
    "Name three colours.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
    "What does a compiler do?",
    "How many legs does a spider have?",
]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a kernel thread or a zombie


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone since the glob
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Triton's models run in its Python
    backend's stub processes), in MiB."""
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += _rss_kb(p)
        todo += _children(p)
    return total / 1024


class Clients(Workers):
    """Closed-loop chat clients; `window()` starts counting anew."""

    def __init__(self, url: str, key: str, n: int, max_tokens: int):
        self.url, self.key, self.max_tokens = url, key, max_tokens
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        super().__init__(threads=n, join_timeout_s=180)

    def window(self) -> None:
        with self.lock:
            self.latencies, self.errors = [], {}

    def work(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(timeout=120) as http:
            k = i
            while not self.stopping.is_set():
                body = {
                    "model": "policy",
                    "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
                    "max_tokens": self.max_tokens,
                    "temperature": 0.7,
                }
                k += 1
                started = time.perf_counter()
                try:
                    status = str(
                        http.post(
                            f"{self.url}/v1/chat/completions", json=body, headers=headers
                        ).status_code
                    )
                except httpx.HTTPError as err:
                    status = type(err).__name__
                took = time.perf_counter() - started
                with self.lock:
                    if status == "200":
                        self.latencies.append(took)
                    else:
                        self.errors[status] = self.errors.get(status, 0) + 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    opts = parser.parse_args()
    convert_smollm2(opts.model_dir)
    stack = Stack(REPO / ".local" / "bench" / "soak")
    try:
        stack.start_core()
        stack.start_policy(opts.model_dir)
        stack.wait_serving(("policy",))
        stack.start_gateway()
        pids = {name: stack.daemons[name].pid for name in PROCESSES}
        with Clients(stack.gateway_url, stack.api_key, opts.clients, opts.max_tokens) as clients:
            time.sleep(opts.warmup)
            clients.window()
            start_rss = {name: rss_mb(pid) for name, pid in pids.items()}
            started = time.monotonic()
            time.sleep(opts.duration)
            with clients.lock:
                latencies, errors = list(clients.latencies), dict(clients.errors)
            wall = time.monotonic() - started
            end_rss = {name: rss_mb(pid) for name, pid in pids.items()}
    finally:
        stack.stop()
    growth = {n: 100.0 * (end_rss[n] - start_rss[n]) / start_rss[n] for n in PROCESSES}
    result = {
        "duration_s": round(wall, 1),
        "clients": opts.clients,
        "max_tokens": opts.max_tokens,
        "requests": len(latencies) + sum(errors.values()),
        "throughput_rps": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "rss_mb_start": {n: round(v, 1) for n, v in start_rss.items()},
        "rss_mb_end": {n: round(v, 1) for n, v in end_rss.items()},
        "rss_growth_pct": {n: round(v, 2) for n, v in growth.items()},
        "rss_growth_pct_max": round(max(growth.values()), 2),
        "rss_growth_bound_pct": RSS_GROWTH_BOUND_PCT,
    }
    write_result("soak", result)
    print("| figure | value |\n| --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    return (
        0 if result["errors"] == 0 and result["rss_growth_pct_max"] <= RSS_GROWTH_BOUND_PCT else 1
    )


if __name__ == "__main__":
    sys.exit(main())
