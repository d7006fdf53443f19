"""Generation benchmark: the policy service (gRPC -> Triton, real Kafka log) against in-process
`generate` on the same model, in the same run, on this machine.

    python -m bench.generation            # writes bench/results/generation.json

Figures (SmolLM2-135M-Instruct, float32 on CPU, greedy):
- `ratio_vs_inprocess`: service tokens/s for one request of 8 prompts / `model.generate` tokens/s
  for the same 8 prompts batched in process (goal >= 0.95). Both count the same tokens (each row
  up to its end-of-sequence token or max_new_tokens); runs alternate so drift hits both alike.
- `batching_gain_16`: tokens/s of 16 clients calling at once / the same 16 calls one at a time
  (goal >= 4, from Triton's dynamic batching), with p50/p99 latency of both.
"""

from __future__ import annotations

import argparse
import json
import os
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
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
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
    service = None
    (state / "model-repository").mkdir(parents=True, exist_ok=True)
    try:
        triton.start()
        if broker is not None:
            broker.start()
        settings = PolicySettings(
            model_dir=opts.model_dir,
            weights_root=state / "weights",
            model_repository=state / "model-repository",
            grpc=GrpcSettings(host="127.0.0.1", port=0, metrics_port=0),
            triton=TritonSettings(url=triton.grpc_url, timeout_s=600),
            kafka=KafkaSettings(
                bootstrap_servers=broker.bootstrap_servers if broker else "127.0.0.1:1"
            ),
            log_generations=broker is not None,
            follow_weights_topic=False,
        )
        service = PolicyService.launch(settings)
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(service.address))
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
        service_call(stub, batch, 4)  # warm-up both sides
        in_process(model, tok, batch, 4, eos)
        svc, ref = [], []
        for _ in range(opts.rounds):
            t, n = service_call(stub, batch, opts.new_tokens)
            svc.append(n / t)
            t, n = in_process(model, tok, batch, opts.new_tokens, eos)
            ref.append(n / t)
        del model
        sequential = clients(stub, PROMPTS[: opts.clients], opts.new_tokens // 2, concurrent=False)
        concurrent = [
            clients(stub, PROMPTS[: opts.clients], opts.new_tokens // 2, concurrent=True)
            for _ in range(2)
        ]
        conc_latencies = [x for c in concurrent for x in c[2]]
        conc_tps = statistics.median(n / wall for wall, n, _ in concurrent)
        seq_tps = sequential[1] / sequential[0]
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
        }
        write_result("generation", result)
        print(json.dumps(result, indent=2))
    finally:
        if service is not None:
            service.stop(grace_s=1)
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
