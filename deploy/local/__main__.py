"""The local stack: a real Kafka broker (KRaft) and a real Triton server on this machine.

    python -m deploy.local up       # start both (state, logs and pid files under .local/stack/)
    python -m deploy.local status   # what runs, where, and whether it answers
    python -m deploy.local down     # stop both
    python -m deploy.local smoke    # up, one round trip through each, down
    python -m deploy.local platform-up    # the whole platform, left running (deploy/local/platform.py)
    python -m deploy.local platform-down  # stop it
    python -m deploy.local demo [--preset quick] ...  # the main job (deploy/local/demo.py)
    python -m deploy.local reap     # stop every daemon a run left under .local/ (tests included)

`up` writes `.local/stack/env` with the settings the services read
(RLHF_KAFKA_BOOTSTRAP_SERVERS, RLHF_TRITON_URL), so `set -a; . .local/stack/env` points a shell at it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from deploy.local.kafka import KafkaBroker
from deploy.local.process import Daemon
from deploy.local.triton import TritonServer

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL = REPO_ROOT / ".local"
STACK = LOCAL / "stack"


def _broker() -> KafkaBroker:
    return KafkaBroker(state_dir=STACK / "kafka")


def _triton(models: list[str]) -> TritonServer:
    ports_file = STACK / "triton" / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
    return TritonServer(
        state_dir=STACK / "triton",
        model_repository=STACK / "model-repository",
        models=models,
        grpc_port=ports.get("grpc", 0),
        http_port=ports.get("http", 0),
        metrics_port=ports.get("metrics", 0),
    )


def up() -> tuple[KafkaBroker, TritonServer]:
    from deploy.local.probe_model import probe_spec, save_probe
    from services.common.triton_repo import write_model

    STACK.mkdir(parents=True, exist_ok=True)
    broker = _broker()
    if not broker.running:
        t0 = time.monotonic()
        broker.start()
        print(
            f"kafka     up in {time.monotonic() - t0:4.1f}s  pid {broker.daemon.pid}  {broker.bootstrap_servers}"
        )
    repository = STACK / "model-repository"
    weights = STACK / "probe.safetensors"
    save_probe(weights)
    write_model(repository, probe_spec(weights))
    triton = _triton(["probe"])
    if not triton.running:
        t0 = time.monotonic()
        triton.start()
        (STACK / "triton" / "ports.json").write_text(
            json.dumps(
                {"grpc": triton.grpc_port, "http": triton.http_port, "metrics": triton.metrics_port}
            )
        )
        print(
            f"triton    up in {time.monotonic() - t0:4.1f}s  pid {triton.daemon.pid}  {triton.grpc_url}"
        )
    (STACK / "env").write_text(
        f"RLHF_KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}\nRLHF_TRITON_URL={triton.grpc_url}\n"
    )
    return broker, triton


def down() -> None:
    for name, daemon in (
        ("triton", Daemon("tritonserver", STACK / "triton")),
        ("kafka", Daemon("kafka", STACK / "kafka")),
    ):
        print(f"{name:9s} {'stopped' if daemon.stop() else 'was not running'}")


def status() -> int:
    broker, triton = _broker(), _triton([])
    ok = True
    for name, daemon, where in (
        ("kafka", broker.daemon, broker.bootstrap_servers),
        ("triton", triton.daemon, triton.grpc_url),
    ):
        pid = daemon.pid
        ok &= pid is not None
        print(f"{name:9s} {'pid ' + str(pid) if pid else 'not running':14s} {where}")
    return 0 if ok else 1


def reap() -> None:
    """Stops every daemon whose pid file lies under .local/ (a killed test run leaves some)."""
    for pid_file in sorted(LOCAL.rglob("*.pid")):
        daemon = Daemon(pid_file.stem, pid_file.parent)
        if daemon.stop(timeout_s=20):
            print(f"stopped {pid_file.stem} ({pid_file.parent})")


def demo(argv: list[str]) -> int:
    from deploy.local import demo as main_job

    return main_job.main(argv)


def platform_up(argv: list[str]) -> int:
    from deploy.local import platform

    return platform.up(argv)


def platform_down(argv: list[str]) -> int:
    from deploy.local import platform

    return platform.down(argv)


def smoke() -> None:
    """One round trip through the real Kafka broker and the real Triton server."""
    import numpy as np

    from services.common import topics
    from services.common.kafka import decode, make_consumer, make_producer
    from services.common.settings import TritonSettings
    from services.common.triton_client import connect, infer
    from services.genproto.rlhf.v1 import events_pb2

    broker, triton = up()
    try:
        kafka = broker.client_settings(client_id="demo")
        rollout = events_pb2.Rollout(
            rollout_id=f"demo-{uuid.uuid4().hex[:12]}",
            group_id="demo",
            prompt_token_ids=[1, 2],
            response_token_ids=[3],
            behaviour_logprobs=[-0.1],
            reference_logprobs=[-0.2],
            reward=1.0,
        )
        producer = make_producer(kafka)
        meta = producer.send(topics.ROLLOUTS, key=rollout.rollout_id, value=rollout).get(timeout=30)
        producer.close()
        consumer = make_consumer(kafka, f"demo-{uuid.uuid4().hex[:8]}", [topics.ROLLOUTS])
        got = None
        for _ in range(60):
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    if r.key.decode() == rollout.rollout_id:
                        got = decode(events_pb2.Rollout, r.value)
            if got:
                break
        consumer.close()
        assert got == rollout, "the rollout did not come back from Kafka"
        print(
            f"kafka     rollout {rollout.rollout_id} -> {topics.ROLLOUTS}[{meta.partition}]@{meta.offset} -> consumed back"
        )

        client = connect(TritonSettings(url=triton.grpc_url))
        x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        out = infer(client, "probe", {"INPUT": x}, ["OUTPUT"])["OUTPUT"]
        client.close()
        print(f"triton    probe model {x.shape} -> {out.shape}: {np.round(out[0], 4).tolist()}")
    finally:
        down()


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local", description=__doc__.splitlines()[0]
    )
    with_args = {"demo": demo, "platform-up": platform_up, "platform-down": platform_down}
    commands = {"up": up, "down": down, "status": status, "smoke": smoke, "reap": reap}
    parser.add_argument("command", choices=[*commands, *with_args])
    options, rest = parser.parse_known_args()
    if options.command in with_args:
        return with_args[options.command](rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    result = commands[options.command]()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
