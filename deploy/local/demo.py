"""The main job, on this machine: the whole RLHF loop as services, on the real Kafka broker and the
real Triton server, with SmolLM2-135M-Instruct as the policy.

    make demo        # = python -m deploy.local demo, after `make setup models`

1. Stage 2 offline: `rlhf train-reward` fits a MiniLM reward model on preference pairs that favour
   concise answers (a learnable rule, generated here), and reports held-out accuracy.
2. The stack: Kafka (KRaft) and Triton; the policy, reward and reference gRPC services load their
   models into Triton; the gateway and the curator start.
3. Live feedback: two chat completions through the gateway's OpenAI-compatible API, a thumbs-up
   on one and a thumbs-down on the other; the curator turns them into preference records.
4. Stage 3 online: the rollout worker samples groups from the policy, scores them with the reward
   and reference services, and writes rollouts to Kafka; the trainer (GRPO) consumes them, updates
   the policy, checkpoints, and pushes each new weights version to the policy replica.
5. The policy now serves the trained version: a last chat completion names it.

Everything runs as the separate processes it runs as in production (`python -m services.X...`),
configured through the same environment variables; logs are under .local/demo/. All of it is
stopped at the end, whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.kafka import KafkaBroker
from deploy.local.process import Daemon, free_port
from deploy.local.triton import TritonServer

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / ".local" / "demo"


@dataclass
class DemoConfig:
    policy_dir: Path = REPO_ROOT / "models" / "smollm2-135m-instruct"
    """Initial policy and frozen reference (make models)."""
    reward_dir: Path = REPO_ROOT / "models" / "demo-reward"
    """Where stage 2 writes the reward model (kept between runs)."""
    train_steps: int = 3
    """GRPO updates to run (each pushes a new weights version)."""
    samples_per_prompt: int = 4
    """n: the group size GRPO normalises over."""
    prompts_per_step: int = 2
    """Prompts (groups) in one update."""
    max_new_tokens: int = 24
    """Length cap of each sampled response."""


PROMPT_TOPICS = [
    "the capital of France",
    "what a CPU does",
    "why the sky is blue",
    "how plants make food",
    "what Kafka is used for",
    "the boiling point of water",
    "what a prime number is",
    "how vaccines work",
    "what DNS does",
    "why we have seasons",
    "what an API is",
    "how a rainbow forms",
    "what RAM is",
    "how bees make honey",
    "what gravity is",
    "what a black hole is",
]
FILLER = [
    "Well, that is a really interesting question and there is a lot one could say about it.",
    "Let me think about this carefully and explain it step by step in great detail for you.",
    "Before answering, it is worth noting that many people have wondered about this topic.",
]


def preference_data(path: Path, seed: int = 0) -> Path:
    """Pairs where the concise answer is chosen over a rambling one (the rule stage 3 learns)."""
    rng = random.Random(seed)
    rows = []
    for topic in PROMPT_TOPICS * 8:
        answer = f"In short: {topic} is explained simply."
        rambling = " ".join(rng.sample(FILLER, k=2)) + f" Anyway, about {topic}, " + answer.lower()
        rows.append({"prompt": f"Tell me about {topic}.", "chosen": answer, "rejected": rambling})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_data(path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in PROMPT_TOPICS)
    )
    return path


def preferences_from(bootstrap_servers: str, response_ids: set[str], timeout_s: float = 60):
    """The preference records the curator derived from the given responses."""
    from services.common import topics
    from services.common.kafka import decode, make_consumer
    from services.common.settings import KafkaSettings
    from services.genproto.rlhf.v1 import events_pb2

    settings = KafkaSettings(bootstrap_servers=bootstrap_servers, client_id="demo")
    consumer = make_consumer(settings, f"demo-{os.urandom(4).hex()}", [topics.PREFERENCES])
    found: dict[str, events_pb2.PreferenceRecord] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(found) < len(response_ids):
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    record = decode(events_pb2.PreferenceRecord, r.value)
                    for rid in set(record.derived_from) & response_ids:
                        found[rid] = record
    finally:
        consumer.close()
    return list(found.values())


def _health_ok(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def _http(method: str, url: str, body: dict | None = None, key: str = "") -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read() or b"{}")


class Services:
    """The platform's processes, each a Daemon with its log under .local/demo/."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.daemons: list[Daemon] = []

    def start(self, name: str, module: str, extra: dict[str, str]) -> Daemon:
        daemon = Daemon(name, DEMO)
        daemon.stop()  # a previous, interrupted demo
        daemon.start([sys.executable, "-m", module], env={**self.env, **extra}, cwd=REPO_ROOT)
        self.daemons.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop(timeout_s=30)


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def fresh_state() -> None:
    """Each demo starts from scratch: a previous run's broker data, checkpoints and weights would
    otherwise be resumed (the trainer would find its steps done). Its daemons are stopped first."""
    for pid_file in DEMO.rglob("*.pid") if DEMO.exists() else []:
        Daemon(pid_file.stem, pid_file.parent).stop()
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(parents=True)


def run(config: DemoConfig) -> None:
    fresh_state()
    t0 = step("1. reward model: rlhf train-reward on preference pairs (concise answers preferred)")
    if not (config.reward_dir / "model.safetensors").exists():
        data = preference_data(DEMO / "preferences.jsonl")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "train-reward",
                "--data",
                str(data),
                "--output",
                str(config.reward_dir),
                "--set",
                "epochs=2",
                "--set",
                "learning_rate=5e-5",
            ],
            check=True,
            cwd=REPO_ROOT,
        )
    summary = json.loads((config.reward_dir / "training_summary.json").read_text())
    print(
        f"reward model ready in {time.monotonic() - t0:.0f}s: {json.dumps(summary.get('metrics', summary))[:300]}"
    )

    t0 = step("2. stack: Kafka, Triton, policy/reward/reference services, gateway, curator")
    broker = KafkaBroker(state_dir=DEMO / "kafka")
    triton = TritonServer(state_dir=DEMO / "triton", model_repository=DEMO / "model-repository")
    (DEMO / "model-repository").mkdir(exist_ok=True)
    api_key = "demo-" + os.urandom(8).hex()
    ports = {name: free_port() for name in ("policy", "reward", "reference", "gateway")}
    services: Services | None = None
    try:
        broker.start()
        triton.start()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "RLHF_TRITON_URL": triton.grpc_url,
        }
        services = Services(env)
        repo = str(DEMO / "model-repository")
        services.start(
            "policy",
            "services.policy.server",
            {
                "RLHF_POLICY_MODEL_DIR": str(config.policy_dir),
                "RLHF_POLICY_MODEL_REPOSITORY": repo,
                "RLHF_POLICY_MODEL_NAME": "policy",
                "RLHF_POLICY_WEIGHTS_ROOT": str(DEMO / "policy-weights"),
                "RLHF_POLICY_GRPC__PORT": str(ports["policy"]),
                "RLHF_POLICY_GRPC__METRICS_PORT": "0",
            },
        )
        services.start(
            "reward",
            "services.reward.server",
            {
                "RLHF_REWARD_MODEL_DIR": str(config.reward_dir),
                "RLHF_REWARD_MODEL_REPOSITORY": repo,
                "RLHF_REWARD_GRPC_PORT": str(ports["reward"]),
                "RLHF_REWARD_GRPC_METRICS_PORT": "0",
            },
        )
        services.start(
            "reference",
            "services.reference.server",
            {
                "RLHF_REFERENCE_MODEL_DIR": str(config.policy_dir),
                "RLHF_REFERENCE_MODEL_REPOSITORY": repo,
                "RLHF_REFERENCE_GRPC_PORT": str(ports["reference"]),
                "RLHF_REFERENCE_GRPC_METRICS_PORT": "0",
            },
        )
        for name in ("policy", "reward", "reference"):
            daemon = next(d for d in services.daemons if d.name == name)
            daemon.wait_ready(lambda p=ports[name]: _health_ok(p), timeout_s=900)
            print(f"{name:9s} serving on 127.0.0.1:{ports[name]} ({time.monotonic() - t0:.0f}s)")
        gateway = services.start(
            "gateway",
            "services.gateway.app",
            {
                "RLHF_GATEWAY_HOST": "127.0.0.1",
                "RLHF_GATEWAY_PORT": str(ports["gateway"]),
                "RLHF_GATEWAY_API_KEY_SHA256": hashlib.sha256(api_key.encode()).hexdigest(),
                "RLHF_GATEWAY_POLICY_URL": f"127.0.0.1:{ports['policy']}",
            },
        )
        base = f"http://127.0.0.1:{ports['gateway']}"
        gateway.wait_ready(
            lambda: _http("GET", f"{base}/readyz").get("policy", False), timeout_s=120
        )
        services.start(
            "curator",
            "services.curator.server",
            {
                "RLHF_CURATOR_STATE_DIR": str(DEMO / "curator"),
                "RLHF_CURATOR_METRICS_PORT": "0",
            },
        )
        print(f"gateway   {base} (chat page at {base}/), curator running")

        def chat(question: str) -> dict:
            """One chat completion through the gateway's OpenAI-compatible API."""
            body = {
                "model": "policy",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": config.max_new_tokens,
                "temperature": 0.7,
                "seed": 1,
            }
            return _http("POST", f"{base}/v1/chat/completions", body, api_key)

        t0 = step("3. live feedback: chat through the gateway, thumbs up and down")
        answers = []
        for question in ("Tell me about what DNS does.", "Tell me about how a rainbow forms."):
            reply = chat(question)
            answers.append(reply)
            text = reply["choices"][0]["message"]["content"].replace("\n", " ")
            print(f"Q: {question}\nA: {text[:160]}  [id {reply['id']}]")
        for reply, thumb in zip(answers, ("up", "down")):
            ack = _http(
                "POST", f"{base}/v1/feedback", {"response_id": reply["id"], "thumb": thumb}, api_key
            )
            print(f"thumbs {thumb:4s} on {reply['id']} -> 202 {ack}")

        t0 = step(
            f"4. online RL: rollout worker -> Kafka -> GRPO trainer x{config.train_steps} -> weights pushed"
        )
        batch = config.samples_per_prompt * config.prompts_per_step
        services.start(
            "trainer",
            "services.trainer.server",
            {
                "RLHF_TRAINER_MODEL_DIR": str(config.policy_dir),
                "RLHF_TRAINER_ALGORITHM": "grpo",
                "RLHF_TRAINER_POLICY_ADDRESSES": f"127.0.0.1:{ports['policy']}",
                "RLHF_TRAINER_BATCH_SIZE": str(batch),
                "RLHF_TRAINER_MAX_STEPS": str(config.train_steps),
                "RLHF_TRAINER_STATE_DIR": str(DEMO / "trainer"),
                "RLHF_TRAINER_LEARNER": json.dumps({"lr": 1e-5, "kl_coef": 0.02}),
            },
        )
        services.start(
            "rollout",
            "services.rollout.worker",
            {
                "RLHF_ROLLOUT_DATASET": str(prompt_data(DEMO / "prompts.jsonl")),
                "RLHF_ROLLOUT_POLICY_ADDRESS": f"127.0.0.1:{ports['policy']}",
                "RLHF_ROLLOUT_REWARD_ADDRESS": f"127.0.0.1:{ports['reward']}",
                "RLHF_ROLLOUT_REFERENCE_ADDRESS": f"127.0.0.1:{ports['reference']}",
                "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": str(config.samples_per_prompt),
                "RLHF_ROLLOUT_PROMPTS_PER_CALL": str(config.prompts_per_step),
                "RLHF_ROLLOUT_MAX_NEW_TOKENS": str(config.max_new_tokens),
                "RLHF_ROLLOUT_MAX_ROLLOUTS": str(batch * config.train_steps),
            },
        )
        trainer = next(d for d in services.daemons if d.name == "trainer")
        log_file = DEMO / "trainer" / "metrics.jsonl"
        shown = 0
        deadline = time.monotonic() + 1800
        while trainer.pid is not None and time.monotonic() < deadline:
            records = (
                [json.loads(line) for line in log_file.read_text().splitlines()]
                if log_file.exists()
                else []
            )
            updates = [r for r in records if r.get("event") == "update"]
            for r in updates[shown:]:
                print(
                    f"step {r['step']}: weights v{r['weights_version']}  reward/mean {r.get('reward/mean', float('nan')):+.3f}"
                    f"  kl {r.get('kl/behaviour_ref_k1', float('nan')):.4f}  rollouts {len(r.get('rollout_ids', []))}"
                    f"  ({time.monotonic() - t0:.0f}s)",
                    flush=True,
                )
            shown = len(updates)
            time.sleep(2)
        if trainer.pid is not None:
            raise TimeoutError(
                "the trainer did not finish its steps in time; see .local/demo/trainer.log"
            )

        step("5. the policy serves the trained version")
        reply = chat("Tell me about what DNS does.")
        print(f"A: {reply['choices'][0]['message']['content'][:160]!r}")
        print(f"served by {reply['system_fingerprint']} (the demo started from weights-v1)")

        step("6. the thumbs, joined with their generations by the curator, as preference data")
        for record in preferences_from(broker.bootstrap_servers, {a["id"] for a in answers}):
            kind = record.WhichOneof("kind")
            detail = f"desirable={record.label.desirable}" if kind == "label" else "pair"
            print(f"rlhf.preferences.v1: {kind} ({detail}) for prompt {record.prompt[-60:]!r}")
        print(f"\ndemo done; logs and the trainer's metrics.jsonl are under {DEMO}")
    finally:
        if services is not None:
            services.stop_all()
        triton.stop()
        broker.stop()


def main() -> None:
    run(DemoConfig())


if __name__ == "__main__":
    main()
