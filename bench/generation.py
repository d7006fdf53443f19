"""Generation benchmark: the policy service (gRPC -> Triton, real Kafka log) against in-process
`generate` on the same model, in the same run, on this machine.

    python -m bench.generation            # writes bench/results/generation.json

Figures (SmolLM2-135M-Instruct, float32 on CPU, greedy):
- `ratio_vs_inprocess`: service tokens/s for one request of 8 prompts / `model.generate` tokens/s
  for the same 8 prompts batched in process (goal >= 0.95). Both count the same tokens (each row
  up to its end-of-sequence token or max_new_tokens); runs alternate so drift hits both alike.
- `batching_gain_16`: tokens/s of 16 clients calling at once / the same 16 calls one at a time
  (goal >= 4, from continuous batching), with p50/p99 latency of both.

Continuous batching (issue 14), each against a baseline measured beside it in the same run:
- the same load against a `static` service (the engine as it was: the dynamic batcher's group
  runs to its end, 0.1 s queue delay) and, for `n8_prefill_gain`, a continuous service with
  `share_prefix=False`;
- Poisson arrivals at 0.5x, 1x and 2x of what one-at-a-time serving sustains (1 / the mean lone
  latency over a fixed mix of short and long prompts and lengths), `--poisson-s` seconds each
  (20 by default on this loaded 2-core machine; the issue asks for about 60), streaming: tokens/s,
  p50/p99 end-to-end latency and time to first token (TTFT), for both engines;
  - `poisson_throughput_ratio`: continuous tokens/s / static tokens/s at 2x (goal >= 1.5);
  - `ttft_p99_ratio`: p99 TTFT at 1x (continuous) / the mean TTFT of the mix's requests sent
    alone (goal <= 3);
- `lone_request_ratio`: one request alone through gRPC + Triton / in-process `generate` of the
  same row, same tokens (goal <= 1.10);
- `n8_prefill_gain`: 8 samples of one 200-token prompt, unshared time / shared time (goal >= 1.5);
- `sweep`: 1/4/16/32 closed-loop clients, tokens/s and p50/p99 latency, both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import grpc
import torch

from bench.run import write_result
from deploy.local.kafka import KafkaBroker
from deploy.local.triton import TritonServer
from services.common.grpc_server import GrpcSettings
from services.common.models import convert_smollm2, load_causal_lm, load_tokenizer
from services.common.settings import KafkaSettings, TritonSettings
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.policy.server import PolicyService
from services.policy.settings import PolicySettings

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a neural network is.",
    "List three uses of copper.",
    "What is the capital of France? Answer in a sentence.",
    "Describe a sunrise in the mountains.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Tell me a fun fact about octopuses.",
    "How do airplanes stay in the air?",
    "Summarise the plot of Romeo and Juliet.",
    "What is photosynthesis?",
    "Name two famous painters and one work each.",
    "How does a bicycle gear work?",
    "Suggest a name for a friendly robot.",
    "What are prime numbers?",
    "Write a haiku about autumn leaves.",
]


def chat(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(rendered, add_special_tokens=False)["input_ids"]


def counted(tokens: list[int], eos: set[int]) -> int:
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
    return len(tokens)


def in_process(model, tok, prompts: list[str], new_tokens: int, eos: set[int]) -> tuple[float, int]:
    ids = [chat(tok, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    return elapsed, sum(counted(row.tolist(), eos) for row in out[:, width:])


def request(prompts: list[str], new_tokens: int) -> policy_pb2.GenerateRequest:
    messages = lambda p: common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="user", content=p)]
    )
    return policy_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(messages=messages(p)) for p in prompts],
        sampling=policy_pb2.SamplingParams(n=1, max_new_tokens=new_tokens, temperature=0.0),
    )


def service_call(stub, prompts: list[str], new_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    response = stub.Generate(request(prompts, new_tokens), timeout=600)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(s.token_ids) for c in response.completions for s in c.samples)


def clients(
    stub, prompts: list[str], new_tokens: int, concurrent: bool
) -> tuple[float, int, list[float]]:
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = service_call(stub, [prompts[i]], new_tokens)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(prompts)):
            one(i)
    wall = time.perf_counter() - start
    return wall, sum(r[1] for r in results), [r[0] for r in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


LONG = (
    "Here is a long message from a user who explains their situation in detail before asking. "
    "They describe the weather, their garden, the tools they own and the plans they made. "
)
MIX = [
    ("Why is the sky blue?", 8),
    ("List three uses of copper.", 12),
    ("Write a haiku about autumn leaves.", 16),
    (LONG * 2 + "What should I plant first?", 8),
    (LONG * 3 + "Which tool do I need most?", 12),
    (LONG * 2 + "Summarise my plans.", 16),
]
"""The Poisson benchmark's requests: a few short and a few long (about 40-60 token) prompts,
lengths 8 to 16 (short, so that a run fits this shared machine)."""


def stream_call(stub, text: str, new_tokens: int, seed: int = 0) -> tuple[float, float, int]:
    """One streamed request: (time to first token, end-to-end time, tokens)."""
    messages = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)])
    call = policy_pb2.GenerateStreamRequest(
        prompt=common_pb2.Prompt(messages=messages),
        sampling=policy_pb2.SamplingParams(
            n=1, max_new_tokens=new_tokens, temperature=0.0, seed=seed, has_seed=True
        ),
    )
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in stub.GenerateStream(call, timeout=600):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return first or float("nan"), time.perf_counter() - start, tokens


def poisson(stub, rate: float, duration_s: float, seed: int) -> dict:
    """Requests from MIX arriving at `rate` per second for `duration_s`, each on its own thread."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append((t, MIX[rng.randrange(len(MIX))]))
        t += rng.expovariate(rate)
    results: list = [None] * len(arrivals)

    def one(i: int, text: str, new_tokens: int) -> None:
        results[i] = stream_call(stub, text, new_tokens, seed=i)

    threads = []
    start = time.perf_counter()
    for i, (at, (text, new_tokens)) in enumerate(arrivals):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        thread = threading.Thread(target=one, args=(i, text, new_tokens))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    ttft, e2e = [r[0] for r in done], [r[1] for r in done]
    return {
        "rate_per_s": rate,
        "requests": len(arrivals),
        "tokens_per_s": sum(r[2] for r in done) / wall,
        "latency_p50_s": percentile(e2e, 0.5),
        "latency_p99_s": percentile(e2e, 0.99),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
    }


def sweep(stub, concurrency: int, calls_each: int, new_tokens: int) -> dict:
    """`concurrency` clients, each sending `calls_each` requests back to back."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(calls_each):
            text = PROMPTS[(c * calls_each + k) % len(PROMPTS)]
            _, e2e, n = stream_call(stub, text, new_tokens)
            with lock:
                latencies.append(e2e)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": concurrency,
        "tokens_per_s": tokens[0] / wall,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
    }


def samples_call(stub, prompt_ids_text: str, n: int, new_tokens: int) -> float:
    """Seconds for n sampled continuations of one prompt in one call."""
    request = policy_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=prompt_ids_text)],
        sampling=policy_pb2.SamplingParams(
            n=n, max_new_tokens=new_tokens, temperature=1.0, seed=5, has_seed=True
        ),
    )
    start = time.perf_counter()
    stub.Generate(request, timeout=600)
    return time.perf_counter() - start


def prompt_of(tok, tokens: int) -> str:
    """A plain-text prompt of exactly `tokens` tokens."""
    ids = tok((LONG * 20), add_special_tokens=False)["input_ids"][:tokens]
    text = tok.decode(ids)
    while len(tok(text)["input_ids"]) > tokens:
        ids = ids[:-1]
        text = tok.decode(ids)
    return text


def inprocess_one(model, tok, text: str, new_tokens: int) -> float:
    ids = torch.tensor([chat(tok, text)])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    return time.perf_counter() - start


def progress(phase: str, **figures) -> None:
    """Each phase's figures as they come (a long run on a shared machine can be cut short)."""
    print(json.dumps({"phase": phase, **figures}), flush=True)


def launch(opts, triton, broker, state: Path, name: str, **overrides) -> PolicyService:
    settings = PolicySettings(
        model_dir=opts.model_dir,
        triton_model=name,
        weights_root=state / f"weights-{name}",
        model_repository=state / "model-repository",
        grpc=GrpcSettings(host="127.0.0.1", port=0, metrics_port=0),
        triton=TritonSettings(url=triton.grpc_url, timeout_s=600),
        kafka=KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers if broker else "127.0.0.1:1"
        ),
        log_generations=broker is not None,
        follow_weights_topic=False,
        max_queued_sequences=1024,
        **overrides,
    )
    return PolicyService.launch(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poisson-s", type=float, default=20.0, help="seconds per Poisson rate")
    parser.add_argument("--sweep", type=str, default="1,4,16,32", help="client counts")
    parser.add_argument(
        "--sample-tokens", type=int, default=8, help="new tokens in the n8 and sweep requests"
    )
    parser.add_argument(
        "--no-kafka", action="store_true", help="skip the generation log (and the broker)"
    )
    opts = parser.parse_args()
    convert_smollm2(opts.model_dir)
    threads = os.cpu_count() or 1
    os.environ["RLHF_POLICY_TORCH_THREADS"] = str(threads)  # Triton's model uses the same threads
    torch.set_num_threads(threads)
    state = REPO / ".local" / "bench" / f"generation-{os.getpid()}"
    triton = TritonServer(state_dir=state / "triton", model_repository=state / "model-repository")
    broker = None if opts.no_kafka else KafkaBroker(state_dir=state / "kafka")
    services: list[PolicyService] = []
    (state / "model-repository").mkdir(parents=True, exist_ok=True)
    try:
        triton.start()
        if broker is not None:
            broker.start()
        service = launch(opts, triton, broker, state, "policy")
        static = launch(
            opts, triton, broker, state, "policy-static", scheduler="static",
            triton_queue_delay_us=100_000,
        )  # fmt: skip
        unshared = launch(opts, triton, broker, state, "policy-unshared", share_prefix=False)
        services += [service, static, unshared]
        stub_of = lambda svc: policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(svc.address))
        stub, static_stub, unshared_stub = stub_of(service), stub_of(static), stub_of(unshared)
        model = load_causal_lm(opts.model_dir, torch.device("cpu"), torch.float32)
        tok = load_tokenizer(opts.model_dir)
        eos = {
            int(e)
            for e in (
                [model.generation_config.eos_token_id]
                if isinstance(model.generation_config.eos_token_id, int)
                else model.generation_config.eos_token_id
            )
        }
        batch = PROMPTS[: opts.batch]
        for s in (stub, static_stub, unshared_stub):
            service_call(s, batch, 4)  # warm-up every side
        in_process(model, tok, batch, 4, eos)
        svc, ref = [], []
        for _ in range(opts.rounds):
            t, n = service_call(stub, batch, opts.new_tokens)
            svc.append(n / t)
            t, n = in_process(model, tok, batch, opts.new_tokens, eos)
            ref.append(n / t)
        # A lone request, against in-process generate of the same row (same greedy tokens).
        lone, lone_ref = [], []
        for _ in range(opts.rounds):
            lone.append(service_call(stub, PROMPTS[:1], opts.new_tokens // 2)[0])
            lone_ref.append(inprocess_one(model, tok, PROMPTS[0], opts.new_tokens // 2))
        # Idle TTFT and one-at-a-time capacity over the Poisson mix.
        idle = [stream_call(stub, text, n) for text, n in MIX]
        idle_ttft = statistics.mean(r[0] for r in idle)
        capacity = 1.0 / statistics.mean(r[1] for r in idle)
        progress("idle", idle_ttft=idle_ttft, capacity=capacity, svc=svc, ref=ref)
        # 8 samples of one 200-token prompt, prefilled once or eight times.
        long_prompt = prompt_of(tok, 200)
        shared_s, unshared_s = [], []
        for _ in range(opts.rounds):
            shared_s.append(samples_call(stub, long_prompt, 8, opts.sample_tokens))
            unshared_s.append(samples_call(unshared_stub, long_prompt, 8, opts.sample_tokens))
        progress("n8", shared_s=shared_s, unshared_s=unshared_s, lone=lone, lone_ref=lone_ref)
        del model
        sequential = clients(stub, PROMPTS[: opts.clients], opts.new_tokens // 2, concurrent=False)
        concurrent = [
            clients(stub, PROMPTS[: opts.clients], opts.new_tokens // 2, concurrent=True)
            for _ in range(2)
        ]
        conc_latencies = [x for c in concurrent for x in c[2]]
        conc_tps = statistics.median(n / wall for wall, n, _ in concurrent)
        seq_tps = sequential[1] / sequential[0]
        progress("batching", sequential=seq_tps, concurrent=conc_tps, svc=svc, ref=ref)
        rates = {}
        for factor in (0.5, 1.0, 2.0):
            rates[f"{factor}x"] = {
                mode: poisson(s, factor * capacity, opts.poisson_s, seed=int(factor * 10))
                for mode, s in (("continuous", stub), ("static", static_stub))
            }
            progress(f"poisson {factor}x", **rates[f"{factor}x"])
        sweeps = {}
        for mode, s in (("continuous", stub), ("static", static_stub)):
            sweeps[mode] = [sweep(s, int(c), 1, opts.sample_tokens) for c in opts.sweep.split(",")]
            progress(f"sweep {mode}", rows=sweeps[mode])
        result = {
            "model": opts.model_dir.name,
            "device": "cpu",
            "dtype": "float32",
            "torch_threads": threads,
            "new_tokens": opts.new_tokens,
            "batch": opts.batch,
            "rounds": opts.rounds,
            "kafka_generation_log": broker is not None,
            "service_tokens_per_s_batch": statistics.median(svc),
            "inprocess_tokens_per_s_batch": statistics.median(ref),
            "service_tokens_per_s_runs": svc,
            "inprocess_tokens_per_s_runs": ref,
            "ratio_vs_inprocess": statistics.median(svc) / statistics.median(ref),
            "clients": opts.clients,
            "client_new_tokens": opts.new_tokens // 2,
            "sequential_tokens_per_s": seq_tps,
            "concurrent_tokens_per_s": conc_tps,
            "batching_gain_16": conc_tps / seq_tps,
            "sequential_latency_p50_s": percentile(sequential[2], 0.5),
            "sequential_latency_p99_s": percentile(sequential[2], 0.99),
            "concurrent_latency_p50_s": percentile(conc_latencies, 0.5),
            "concurrent_latency_p99_s": percentile(conc_latencies, 0.99),
            "batch_size_mean": _mean_batch(service),
            "lone_request_s_runs": lone,
            "lone_inprocess_s_runs": lone_ref,
            "lone_request_ratio": statistics.median(lone) / statistics.median(lone_ref),
            "n8_shared_s_runs": shared_s,
            "n8_unshared_s_runs": unshared_s,
            "n8_prefill_gain": statistics.median(unshared_s) / statistics.median(shared_s),
            "poisson_seconds_per_rate": opts.poisson_s,
            "one_at_a_time_capacity_per_s": capacity,
            "idle_ttft_s": idle_ttft,
            "poisson": rates,
            "poisson_throughput_ratio": rates["2.0x"]["continuous"]["tokens_per_s"]
            / rates["2.0x"]["static"]["tokens_per_s"],
            "ttft_p99_ratio": rates["1.0x"]["continuous"]["ttft_p99_s"] / idle_ttft,
            "sweep": sweeps,
        }
        write_result("generation", result)
        print(json.dumps(result, indent=2))
    finally:
        for svc in services:
            svc.stop(grace_s=1)
        triton.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(state, ignore_errors=True)


def _mean_batch(service) -> float:
    registry = service.server.registry
    total = registry.get_sample_value("rlhf_policy_batch_size_sum") or 0.0
    count = registry.get_sample_value("rlhf_policy_batch_size_count") or 1.0
    return total / count


if __name__ == "__main__":
    main()
