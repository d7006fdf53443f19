"""The whole platform as processes on this machine, each started as production starts it
(`python -m services.X`, configured by the same environment variables), state under one folder.

    stack = Stack(REPO_ROOT / ".local" / "platform")
    stack.start_core()                       # Kafka (KRaft) and Triton
    stack.start_policy(model_dir)            # the three model services, each loading into Triton
    ...
    stack.stop()                             # every process this stack started, newest first

`make up` / `make down` (deploy/local/__main__.py) and the demo (deploy/local/demo.py) both drive
this class; the demo starts the parts stage by stage, `make up` all of them at once. Each process
is a `Daemon` with its pid file and log in the state folder, so `Stack.stop_folder(folder)` stops
a stack another process started (`make down`), and nothing is left behind by an interrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.kafka import KafkaBroker
from deploy.local.process import Daemon, free_port
from deploy.local.triton import TritonServer

REPO_ROOT = Path(__file__).resolve().parents[2]

MODEL_SERVICES = ("policy", "reward", "reference")


def grpc_serving(address: str) -> bool:
    """True when the gRPC health service at `address` says SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def http_json(
    method: str, url: str, body: dict | None = None, key: str = "", timeout_s: float = 300
) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read() or b"{}")


class Stack:
    """The platform's processes under `state`; ports are picked free and kept in ports.json."""

    def __init__(self, state: Path, dtype: str = "auto", threads: int = 0):
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        """Compute dtype of the model services and the trainer (auto, float32, bfloat16)."""
        self.threads = threads
        """CPU threads of each process's torch/OpenMP pool (0: their defaults). On a machine of
        few cores, processes that compute at once (the policy generating the next batch while
        the trainer updates) each spinning a pool of every core thrash: 1 keeps them apart."""
        self.daemons: dict[str, Daemon] = {}
        self.ports: dict[str, int] = {}
        self.api_key = "rlhf-" + os.urandom(12).hex()
        self.broker = KafkaBroker(state_dir=self.state / "kafka")
        self.repository = self.state / "model-repository"
        self.triton = TritonServer(
            state_dir=self.state / "triton", model_repository=self.repository
        )

    # -- addresses ----------------------------------------------------------------------------
    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def thread_env(self) -> dict[str, str]:
        if not self.threads:
            return {}
        n = str(self.threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "RLHF_POLICY_TORCH_THREADS": n}

    def control_token_file(self) -> Path:
        """The stack's control token (UpdateWeights, ReloadModel): made once, owner-only."""
        path = self.state / "control-token"
        if not path.exists():
            self.state.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        return path

    def base_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.thread_env(),
            "RLHF_CONTROL_TOKEN_FILE": str(self.control_token_file()),
            "PYTHONPATH": str(REPO_ROOT),
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "RLHF_TRITON_URL": self.triton.grpc_url,
        }

    def _port(self, name: str) -> int:
        self.ports[name] = free_port()
        (self.state / "ports.json").write_text(json.dumps(self.ports, indent=1))
        return self.ports[name]

    # -- processes ----------------------------------------------------------------------------
    def start(self, name: str, module: str, env: dict[str, str]) -> Daemon:
        daemon = Daemon(name, self.state)
        daemon.stop()  # left over from an interrupted run
        daemon.start([sys.executable, "-m", module], env={**self.base_env(), **env}, cwd=REPO_ROOT)
        self.daemons[name] = daemon
        return daemon

    def start_core(self) -> None:
        """Kafka and Triton (explicit model control: each model service loads its own model)."""
        self.repository.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        self.triton.environment = self.thread_env()  # Triton passes it on to its model stubs
        self.triton.start()
        self.daemons["kafka"], self.daemons["triton"] = self.broker.daemon, self.triton.daemon

    def start_policy(self, model_dir: Path) -> Daemon:
        port = self._port("policy")
        return self.start(
            "policy",
            "services.policy",
            {
                "RLHF_POLICY_MODEL_DIR": str(model_dir),
                "RLHF_POLICY_MODEL_NAME": "policy",
                "RLHF_POLICY_MODEL_REPOSITORY": str(self.repository),
                "RLHF_POLICY_WEIGHTS_ROOT": str(self.state / "policy-weights"),
                "RLHF_POLICY_DTYPE": self.dtype,
                "RLHF_POLICY_GRPC_PORT": str(port),
                "RLHF_POLICY_GRPC_METRICS_PORT": str(self._port("policy-metrics")),
            },
        )

    def start_reward(
        self, model_dir: Path | None, versions_root: Path | None = None, **settings
    ) -> Daemon:
        """The RewardService over a reward model (`model_dir`, following `versions_root`), or
        over a rule with neither (`annotator="module:function"`); `settings` are RewardSettings
        fields."""
        port = self._port("reward")
        extra = {f"RLHF_REWARD_{k.upper()}": str(v) for k, v in settings.items()}
        if model_dir is not None:
            extra["RLHF_REWARD_MODEL_DIR"] = str(model_dir)
        if versions_root is not None:
            extra["RLHF_REWARD_VERSIONS_ROOT"] = str(versions_root)
        return self.start(
            "reward",
            "services.reward",
            {
                "RLHF_REWARD_MODEL_REPOSITORY": str(self.repository),
                "RLHF_REWARD_FOLLOW_INTERVAL_S": "5",
                "RLHF_REWARD_DTYPE": self.dtype,
                "RLHF_REWARD_GRPC_PORT": str(port),
                "RLHF_REWARD_GRPC_METRICS_PORT": str(self._port("reward-metrics")),
                **extra,
            },
        )

    def start_reference(self, model_dir: Path) -> Daemon:
        port = self._port("reference")
        return self.start(
            "reference",
            "services.reference",
            {
                "RLHF_REFERENCE_MODEL_DIR": str(model_dir),
                "RLHF_REFERENCE_MODEL_REPOSITORY": str(self.repository),
                "RLHF_REFERENCE_DTYPE": self.dtype,
                "RLHF_REFERENCE_GRPC_PORT": str(port),
                "RLHF_REFERENCE_GRPC_METRICS_PORT": str(self._port("reference-metrics")),
            },
        )

    def start_judge(
        self, model_dir: Path, rubric_file: Path | None = None, policy_address: str = "", **settings
    ) -> Daemon:
        """The JudgeService, publishing AI labels to this stack's Kafka: its own copy of
        `model_dir` in Triton, or (`policy_address` set) the running policy's model, which then
        costs no memory of its own; `settings` are JudgeSettings fields."""
        extra = {f"RLHF_JUDGE_{k.upper()}": str(v) for k, v in settings.items()}
        if rubric_file is not None:
            extra["RLHF_JUDGE_RUBRIC_FILE"] = str(rubric_file)
        if policy_address:
            extra["RLHF_JUDGE_POLICY_ADDRESS"] = policy_address
        return self.start(
            "judge",
            "services.judge",
            {
                "RLHF_JUDGE_MODEL_DIR": str(model_dir),
                "RLHF_JUDGE_MODEL_REPOSITORY": str(self.repository),
                "RLHF_JUDGE_DTYPE": self.dtype,
                "RLHF_JUDGE_GRPC_PORT": str(self._port("judge")),
                "RLHF_JUDGE_GRPC_METRICS_PORT": str(self._port("judge-metrics")),
                # A batch of 16 pairs is 32 long prompts (rubric, question, two answers) through
                # the judge's model: minutes on a busy CPU, more than an inference's default 60 s.
                "RLHF_TRITON_TIMEOUT_S": "600",
                **extra,
            },
        )

    def wait_serving(self, names: tuple[str, ...], timeout_s: float = 900) -> None:
        for name in names:
            self.daemons[name].wait_ready(
                lambda n=name: grpc_serving(self.address(n)), timeout_s=timeout_s
            )

    def start_gateway(self) -> Daemon:
        port = self._port("gateway")
        daemon = self.start(
            "gateway",
            "services.gateway",
            {
                "RLHF_GATEWAY_HOST": "127.0.0.1",
                "RLHF_GATEWAY_PORT": str(port),
                "RLHF_GATEWAY_API_KEY_SHA256": hashlib.sha256(self.api_key.encode()).hexdigest(),
                "RLHF_GATEWAY_POLICY_URL": self.address("policy"),
                "RLHF_GATEWAY_RATE_LIMIT_BURST": "1000",
                "RLHF_GATEWAY_RATE_LIMIT_PER_S": "500",
            },
        )
        daemon.wait_ready(lambda: self._gateway_ready(), timeout_s=120)
        return daemon

    def _gateway_ready(self) -> bool:
        try:
            return bool(http_json("GET", f"{self.gateway_url}/readyz", timeout_s=5).get("policy"))
        except OSError:
            return False

    def start_curator(self) -> Daemon:
        return self.start(
            "curator",
            "services.curator",
            {
                "RLHF_CURATOR_STATE_DIR": str(self.state / "curator"),
                "RLHF_CURATOR_METRICS_PORT": str(self._port("curator-metrics")),
            },
        )

    def start_refresh(self, base_model_dir: Path, versions_root: Path, **settings) -> Daemon:
        """The reward-model refresh; `settings` are RefreshSettings fields (refresh_every=...)."""
        extra = {f"RLHF_REFRESH_{k.upper()}": str(v) for k, v in settings.items()}
        return self.start(
            "refresh",
            "services.refresh",
            {
                "RLHF_REFRESH_BASE_MODEL_DIR": str(base_model_dir),
                "RLHF_REFRESH_VERSIONS_ROOT": str(versions_root),
                "RLHF_REFRESH_STATE_DIR": str(self.state / "refresh"),
                "RLHF_REFRESH_REWARD_ADDRESS": self.address("reward"),
                "RLHF_REFRESH_METRICS_PORT": str(self._port("refresh-metrics")),
                **extra,
            },
        )

    def start_trainer(
        self, model_dir: Path, algorithm: str, batch_size: int, max_steps: int, learner: dict
    ) -> Daemon:
        return self.start(
            "trainer",
            "services.trainer",
            {
                "RLHF_TRAINER_MODEL_DIR": str(model_dir),
                "RLHF_TRAINER_ALGORITHM": algorithm,
                "RLHF_TRAINER_POLICY_ADDRESSES": self.address("policy"),
                "RLHF_TRAINER_BATCH_SIZE": str(batch_size),
                "RLHF_TRAINER_MAX_STEPS": str(max_steps),
                "RLHF_TRAINER_STATE_DIR": str(self.state / "trainer"),
                "RLHF_TRAINER_LEARNER": json.dumps({"dtype": self.dtype, **learner}),
                "RLHF_TRAINER_THREADS": str(self.threads),
                "RLHF_TRAINER_METRICS_PORT": str(self._port("trainer-metrics")),
            },
        )

    def start_rollout(
        self,
        dataset: Path,
        samples_per_prompt: int,
        prompts_per_call: int,
        max_new_tokens: int,
        max_rollouts: int,
        seed: int = 0,
        **settings,
    ) -> Daemon:
        extra = {f"RLHF_ROLLOUT_{k.upper()}": str(v) for k, v in settings.items()}
        return self.start(
            "rollout",
            "services.rollout",
            {
                "RLHF_ROLLOUT_DATASET": str(dataset),
                "RLHF_ROLLOUT_POLICY_ADDRESS": self.address("policy"),
                "RLHF_ROLLOUT_REWARD_ADDRESS": self.address("reward"),
                "RLHF_ROLLOUT_REFERENCE_ADDRESS": self.address("reference"),
                "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": str(samples_per_prompt),
                "RLHF_ROLLOUT_PROMPTS_PER_CALL": str(prompts_per_call),
                "RLHF_ROLLOUT_MAX_NEW_TOKENS": str(max_new_tokens),
                "RLHF_ROLLOUT_MAX_ROLLOUTS": str(max_rollouts),
                "RLHF_ROLLOUT_SEED": str(seed),
                "RLHF_ROLLOUT_METRICS_PORT": str(self._port("rollout-metrics")),
                **extra,
            },
        )

    def write_env(self) -> Path:
        """`set -a; . <state>/env` points a shell (or the openai client) at this stack."""
        lines = {
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "RLHF_TRITON_URL": self.triton.grpc_url,
            "OPENAI_BASE_URL": f"{self.gateway_url}/v1" if "gateway" in self.ports else "",
            "OPENAI_API_KEY": self.api_key,
        }
        path = self.state / "env"
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        path.chmod(0o600)
        return path

    def stop(self, name: str | None = None) -> None:
        """Stops one process, or all of them, newest first (the broker last)."""
        names = [name] if name else list(reversed(self.daemons))
        for n in names:
            daemon = self.daemons.pop(n, None)
            if daemon is not None:
                daemon.stop(timeout_s=30)

    def running(self) -> list[str]:
        return [n for n, d in self.daemons.items() if d.pid is not None]

    @staticmethod
    def stop_folder(state: Path) -> list[str]:
        """Stops every process whose pid file lies under `state`, apps before Triton and Kafka."""
        order = {"kafka": 2, "tritonserver": 1}
        stopped = []
        for pid_file in sorted(Path(state).rglob("*.pid"), key=lambda p: order.get(p.stem, 0)):
            if Daemon(pid_file.stem, pid_file.parent).stop(timeout_s=30):
                stopped.append(pid_file.stem)
        return stopped

    @staticmethod
    def alive_in(state: Path) -> list[str]:
        """Names of the processes under `state` that still run."""
        return [
            p.stem for p in Path(state).rglob("*.pid") if Daemon(p.stem, p.parent).pid is not None
        ]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
