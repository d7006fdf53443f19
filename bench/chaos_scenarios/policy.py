"""Policy faults.

`replica_kill`: two replicas of one model (A in this process on the shared Triton; B a
`python -m services.policy` process with a Triton of its own, as each replica pod has its
sidecar in the Helm chart), callers on a channel to both (services/common/channels.replica_channel), and a real
trainer pushing every new version to both and announcing it on rlhf.weights.v1. B is killed -9
while callers generate: every call must still succeed (on A), the trainer must keep training
(its push to B is a failed result, not an error), and B, started again, must catch up to the
current version from the weights topic.

`bad_weights`: corrupt, truncated, wrong-shaped and stale pushes, and a corrupt announcement,
while a caller generates: each is refused, the old version keeps serving the same tokens, and
each refusal shows in `rlhf_policy_weights_updates_total{result="refused"}` and in the log.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import time
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.chaos_scenarios import ChaosEnv, Row, wait_for
from bench.chaos_scenarios.trainer import NEVER_STALE, PARTITIONS, GroupProducer, count_used
from bench.workers import Workers
from deploy.local.process import Daemon, free_port
from deploy.local.triton import TritonServer
from services.common import topics
from services.common.channels import replica_channel
from services.common.kafka import make_producer
from services.genproto.rlhf.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc
from services.trainer.metrics import read_log
from tests.integration.trainer.helpers import REPO, private_topic, start_trainer, trainer_env
from tests.support.policy_stack import policy_stack
from tests.support.push import build_manifest, push_folder
from tests.support.tiny_models import tiny_causal_lm

POLICY_SERVICE = "rlhf.v1.PolicyService"


def request(i: int, max_new_tokens: int = 4) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=f"Tell me about chaos {i}")],
        sampling=policy_pb2.SamplingParams(n=1, max_new_tokens=max_new_tokens),
    )


class Callers(Workers):
    """Threads calling Generate on `channel` until stopped: answers, failures and versions."""

    def __init__(self, channel: grpc.Channel, threads: int = 2):
        self.stub = policy_pb2_grpc.PolicyServiceStub(channel)
        self.answered = 0
        self.failed: list[str] = []
        self.versions: list[int] = []
        self.tokens: list[tuple[int, ...]] = []
        super().__init__(threads=threads, join_timeout_s=120)

    def work(self, n: int) -> None:
        i = 0
        while not self.stopping.is_set():
            try:
                reply = self.stub.Generate(request(n * 1000 + i % 3), timeout=60)
                sample = reply.completions[0].samples[0]
                self.answered += 1
                self.versions.append(sample.weights_version)
                self.tokens.append(tuple(sample.token_ids))
            except grpc.RpcError as exc:
                self.failed.append(f"{exc.code().name}: {exc.details()}")
            i += 1


def policy_process(env: ChaosEnv, triton, state, model_name: str, port: int) -> Daemon:
    """Starts replica B as its own process on a fixed port (a restart comes back there)."""
    daemon = Daemon("policy-b", state)
    daemon.start(
        [sys.executable, "-m", "services.policy"],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RLHF_POLICY_MODEL_DIR": str(env.lm_dir),
            "RLHF_POLICY_MODEL_NAME": model_name,
            "RLHF_POLICY_TRITON_MODEL": f"{model_name}-b",
            "RLHF_POLICY_WEIGHTS_ROOT": str(state / "weights"),
            "RLHF_POLICY_MODEL_REPOSITORY": str(triton.model_repository),
            "RLHF_POLICY_LOG_GENERATIONS": "false",
            "RLHF_POLICY_FOLLOW_WEIGHTS_TOPIC": "true",
            "RLHF_POLICY_GRPC_HOST": "127.0.0.1",
            "RLHF_POLICY_GRPC_PORT": str(port),
            "RLHF_POLICY_GRPC_METRICS_PORT": "0",
            "RLHF_POLICY_GRPC_SHUTDOWN_GRACE_S": "1",
            "RLHF_TRITON_URL": triton.grpc_url,
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": env.kafka.bootstrap_servers,
        },
        cwd=REPO,
    )
    return daemon


def served_version(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            info = policy_pb2_grpc.PolicyServiceStub(channel).GetModelInfo(
                policy_pb2.GetModelInfoRequest(), timeout=2
            )
            return info.weights_version
        except grpc.RpcError:
            return None


def triton_crashed(triton: TritonServer) -> bool:
    """Gone, or aborted: after a heap-corruption abort the server printed `Signal (6) received`
    and its process stayed, answering nothing."""
    log = triton.daemon.log_file
    return not triton.running or (log.exists() and "Signal (" in log.read_text(errors="replace"))


def triton_survived(row: Row, triton: TritonServer) -> None:
    """B's restart reloads its Triton model; Triton must live through it. When it did not, it is
    started again (as the kubelet restarts a sidecar; its log kept beside) and the run goes on to
    see B recover."""
    wait_for(lambda: triton_crashed(triton), 10, poll_s=1.0)
    if not row.check(not triton_crashed(triton), "B's Triton lives through B's kill and restart"):
        log = triton.daemon.log_file
        lines = log.read_text(errors="replace").splitlines()
        crash = [
            line for line in lines if "corrupt" in line or "malloc" in line or "Signal" in line
        ]
        row.notes.append(f"B's Triton aborted: {' / '.join(crash[-2:])}")
        triton.daemon.kill()
        log.rename(log.with_suffix(f".crashed-{len(row.failures)}.log"))
        triton.start()


def generated_version(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = policy_pb2_grpc.PolicyServiceStub(channel).Generate(request(0), timeout=20)
            return reply.completions[0].samples[0].weights_version
        except grpc.RpcError:
            return None


def publishes(log_path) -> list[dict]:
    if not log_path.exists():
        return []
    return [r for r in read_log(log_path) if r.get("event") == "publish"]


def replica_kill(env: ChaosEnv, kills: int = 1, seed: int = 0) -> Row:
    row = Row("policy replica kill -9")
    rng = random.Random(seed)
    model_name = f"chaos-policy-{uuid.uuid4().hex[:6]}"
    state = env.folder("replica-kill")
    b_address = f"127.0.0.1:{free_port()}"
    b_triton = TritonServer(state_dir=state / "triton-b", model_repository=state / "repo-b")
    b_triton.model_repository.mkdir(exist_ok=True)
    b_triton.start()
    b, trainer = Daemon("policy-b", state / "b"), Daemon("trainer", state / "trainer")
    try:
        return _replica_kill(env, row, rng, kills, model_name, state, b_address, b_triton)
    finally:
        for daemon in (b, trainer, b_triton.daemon):  # the same pid files: whatever still runs
            daemon.kill()


def _replica_kill(env, row, rng, kills, model_name, state, b_address, b_triton) -> Row:
    b_port = int(b_address.rsplit(":", 1)[1])
    b = policy_process(env, b_triton, state / "b", model_name, b_port)
    common = {"model_name": model_name, "log_generations": False}
    with policy_stack(env.triton, env.kafka, env.lm_dir, state / "a", **common) as a:
        row.check(wait_for(lambda: served_version(b_address) is not None, 240), "B starts")
        topic = private_topic(env.kafka, PARTITIONS)
        trainer_state = state / "trainer"
        trainer = start_trainer(
            trainer_state,
            trainer_env(
                env.kafka, env.lm_dir, trainer_state, topic,
                RLHF_TRAINER_IDLE_EXIT_S="6", RLHF_TRAINER_WEIGHTS_TOPIC=topics.WEIGHTS,
                RLHF_TRAINER_PUSH_EVERY="2", RLHF_TRAINER_CHECKPOINT_EVERY="1", **NEVER_STALE,
                RLHF_TRAINER_MODEL_NAME=model_name, RLHF_TRAINER_PUSH_TIMEOUT_S="30",
                RLHF_TRAINER_POLICY_ADDRESSES=f"{a.address},{b_address}",
            ),
        )  # fmt: skip
        log_path = trainer_state / "metrics.jsonl"
        channel = replica_channel(f"{a.address},{b_address}", [POLICY_SERVICE])
        with (
            GroupProducer(env.kafka, topic, "replica-g", every_s=1.5) as producer,
            Callers(channel) as callers,
        ):
            row.check(wait_for(lambda: publishes(log_path), 180), "the trainer publishes")
            for _ in range(kills):
                answered = callers.answered
                wait_for(lambda answered=answered: callers.answered >= answered + 2, 60)
                time.sleep(rng.uniform(0.0, 1.0))
                b.kill()  # SIGKILL, while callers generate
                row.injected += 1
                published = len(publishes(log_path))
                row.check(
                    wait_for(
                        lambda published=published: len(publishes(log_path)) >= published + 2, 120
                    ),
                    "the trainer keeps training and publishing while B is dead",
                )
                pushes = publishes(log_path)[published:]
                row.check(
                    all([x["accepted"] for x in p["replicas"]] == [True, False] for p in pushes),
                    "each push while B is dead: accepted by A, a failed result for B",
                )
                b = policy_process(env, b_triton, state / "b", model_name, b_port)
                current = publishes(log_path)[-1]["weights_version"]
                wait_for(
                    lambda current=current, b=b: (
                        b.pid is None or (served_version(b_address) or 0) >= current
                    ),
                    240,
                )
                if not row.check(
                    (served_version(b_address) or 0) >= current,
                    f"B, started again, catches up to version {current}",
                ):
                    break
                triton_survived(row, b_triton)
            producer.stop()
            row.check(wait_for(lambda: trainer.pid is None, 240), "the trainer drains its topic")
            final = publishes(log_path)[-1]["weights_version"]
            row.check(
                wait_for(lambda: served_version(b_address) == a.weights_version == final, 120),
                f"both replicas serve the trainer's last version {final}",
            )
            triton_survived(row, b_triton)
            row.check(
                wait_for(lambda: generated_version(b_address) == final, 180, poll_s=1.0),
                f"B, caught up, generates itself with version {final}",
            )
        channel.close()
        b.stop(timeout_s=20)
    trainer.kill()
    row.requests_failed = len(callers.failed)
    row.check(not callers.failed, f"every call succeeds: {callers.failed[:3]}")
    row.check(callers.answered > 0, "callers were answered")
    count_used(row, producer.acked, log_path)
    row.notes.append(
        f"{callers.answered} generations answered, {len(callers.failed)} failed; "
        f"{len(publishes(log_path))} versions published"
    )
    return row


class RefusalLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "refused" in message:
            self.lines.append(message)


def bad_weights(env: ChaosEnv, rounds: int = 1) -> Row:
    row = Row("bad weights pushed")
    state = env.folder("bad-weights")
    model_name = f"chaos-bad-{uuid.uuid4().hex[:6]}"
    wider = tiny_causal_lm(state / "wider", hidden=96)
    corrupt, truncated = state / "corrupt", state / "truncated"
    for folder in (corrupt, truncated):
        shutil.copytree(env.lm_dir, folder, dirs_exist_ok=True)
    data = (env.lm_dir / "model.safetensors").read_bytes()
    middle = len(data) // 2
    flipped = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (corrupt / "model.safetensors").write_bytes(data[:middle] + flipped + data[middle + 64 :])
    (truncated / "model.safetensors").write_bytes(data[:middle])
    refusals = RefusalLog()
    logging.getLogger("services.policy").addHandler(refusals)
    try:
        with policy_stack(
            env.triton, env.kafka, env.lm_dir, state / "policy", model_name=model_name,
            log_generations=False,
        ) as policy:  # fmt: skip
            served = policy.weights_version
            address = policy.address
            channel = grpc.insecure_channel(address)

            def refused(result: str = "refused", source: str = "push") -> float:
                labels = {"source": source, "result": result}
                return (
                    policy.registry.get_sample_value("rlhf_policy_weights_updates_total", labels)
                    or 0.0
                )

            with Callers(grpc.insecure_channel(address), threads=1) as callers:
                wait_for(lambda: callers.answered >= 1, 60)
                for n in range(rounds):
                    good = build_manifest(env.lm_dir, served + 1)
                    attempts = {
                        "corrupt": (corrupt, build_manifest(env.lm_dir, served + 1)),
                        "truncated": (truncated, good),
                        "wrong-shaped": (wider, build_manifest(wider, served + 1)),
                        "stale": (env.lm_dir, build_manifest(env.lm_dir, served)),
                    }
                    for kind, (folder, manifest) in attempts.items():
                        before = refused()
                        reply = push_folder(
                            channel, folder, manifest.weights_version, manifest=manifest
                        )
                        row.injected += 1
                        row.check(not reply.accepted, f"{kind} weights refused")
                        row.check(reply.weights_version == served, f"{kind}: old version serves")
                        row.check(refused() == before + 1, f"{kind}: refusal counted")
                        row.notes.append(f"{kind}: {reply.reason[:80]}")
                    announce_corrupt(env, model_name, corrupt, served + 1)
                    row.injected += 1
                    row.check(
                        wait_for(lambda n=n: refused(source="announcement") >= n + 1, 60),
                        "a corrupt announcement is refused and counted",
                    )
                answered = callers.answered
                wait_for(lambda answered=answered: callers.answered >= answered + 2, 60)
            channel.close()
            row.check(policy.weights_version == served, "the old version still serves")
            row.check(refused("accepted") == 0, "no bad weights accepted")
    finally:
        logging.getLogger("services.policy").removeHandler(refusals)
    row.requests_failed = len(callers.failed)
    row.check(not callers.failed, f"generation never fails: {callers.failed[:3]}")
    row.check(set(callers.versions) == {served}, "every answer names the old version")
    row.check(len(set(callers.tokens)) <= 3, "the old weights answer as before (3 prompts)")
    row.check(len(refusals.lines) >= row.injected, "every refusal is logged")
    return row


def announce_corrupt(env: ChaosEnv, model_name: str, folder, version: int) -> None:
    """A `rlhf.weights.v1` announcement whose file does not match its digest."""
    created = Timestamp()
    created.GetCurrentTime()
    good = build_manifest(env.lm_dir, version)
    event = events_pb2.WeightsVersionEvent(
        model=model_name,
        weights_version=version,
        file_sha256=dict(good.file_sha256),
        location=str(folder),
        created_at=created,
    )
    producer = make_producer(env.kafka)
    try:
        producer.send(topics.WEIGHTS, key=model_name, value=event).get(timeout=30)
    finally:
        producer.close()
