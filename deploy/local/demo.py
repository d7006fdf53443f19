"""The main job: all three RLHF stages on SmolLM2-135M-Instruct, as services on the real Kafka
broker and the real Triton server, with the live feedback loop closed, then an evaluation that
does not use the reward model, and a report.

    make demo                                   # = python -m deploy.local demo (preset default)
    make demo PRESET=quick                      # the smoke run `make test` does
    make demo ANNOTATOR=services.common.annotator_rules:polite ALGORITHM=grpo SEED=1

1. SFT: `rlhf sft` trains the starting policy on deploy/local/data/sft.jsonl (held-out loss
   before and after).
2. Reward model from rankings: the policy service serves the SFT policy; it answers K times for
   each training prompt; the annotator ranks each group; the rankings go in through the
   gateway's /v1/rankings (expanded there into K(K-1)/2 preference pairs on
   rlhf.preferences.v1); the pairs are read back from Kafka and `rlhf train-reward` fits the
   reward model (held-out pairwise accuracy).
3. Online RL with the live loop closed: the reward and reference services start, the rollout
   worker and the trainer (PPO by default) run as in production and every update is pushed to
   the policy. Meanwhile simulated users chat through the gateway with the official `openai`
   client and press thumbs up/down by the annotator's judgement; the curator turns the thumbs
   into preference pairs and the refresh fine-tunes and publishes new reward-model versions,
   which the reward service serves to later rollouts (each rollout records its version).
4. Evaluation: `rlhf eval` on held-out prompts, final policy vs the SFT policy and vs the base
   model, judged pairwise by the annotator (not the reward model).
5. Report: demo-report/index.html, report.json and the figures (deploy/local/report.py).

The annotator (services.common.annotator, `--annotator module:function`) is the stand-in for
people: it ranks in stage 2, presses thumbs in stage 3 and judges in stage 4. Every process is
stopped at the end, whatever happens; state and logs are under .local/demo/.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc

from deploy.local import report as report_mod
from deploy.local.stack import REPO_ROOT, Stack, http_json, wait_for
from services.common.annotator import DEFAULT_ANNOTATOR, Annotator, load_annotator
from services.refresh.worker import is_held_out

DATA = REPO_ROOT / "deploy" / "local" / "data"
STATE = REPO_ROOT / ".local" / "demo"
BASE_MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"
DEMO_MODELS = REPO_ROOT / "models" / "demo"


@dataclass(frozen=True)
class Preset:
    """One schedule of the demo: how much data and how many steps each stage gets."""

    name: str
    sft_rows: int = 96
    """Demonstrations used (0: all of sft.jsonl)."""
    sft_epochs: int = 1
    sft_lr: float = 5e-5
    rank_prompts: int = 96
    """Training prompts the SFT policy answers K times for the rankings."""
    k: int = 4
    """Answers per ranked prompt (K >= 4)."""
    rm_epochs: int = 2
    rm_lr: float = 5e-5
    rl_steps: int = 10
    """Trainer updates (each pushes a weights version)."""
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    """Length cap of every answer: rankings, rollouts, users and the evaluation."""
    learner: dict = field(default_factory=lambda: {"lr": 3e-5, "kl_coef": 0.05})
    kl_budget: float = 8.0
    """Nats per response the final policy may drift from the SFT reference (the report checks it)."""
    users: int = 1
    """Simulated users chatting while RL runs (each asks for 4 answers)."""
    user_pause_s: float = 6.0
    refresh_wait_s: float = 180.0
    """After the last RL step, how long users go on chatting for a refresh to be published."""
    refresh: dict = field(
        default_factory=lambda: {
            # Small enough that one user's thumbs (about one pair per chat) reach a refresh in
            # the first half of RL, so later rollouts are scored by a refreshed version.
            "refresh_every": 16,
            "min_held_out": 16,
            "held_out_modulus": 5,
            "epochs": 2,
            "learning_rate": 3e-5,
            "tolerance": 0.02,
            # A drop of a few pairs on ~150 held-out ones is noise: it blocks a refresh only
            # when significant (seed 2 had two rejected for a net 4 and 5 pairs of 143, 150).
            "significance": 0.05,
        }
    )
    eval_prompts: int = 100
    dtype: str = "auto"
    """auto: bfloat16 where the hardware has fast bf16 (CUDA, or a CPU with AMX), else float32."""
    threads: int = 0
    """CPU threads per service process; 0: half the cores (generation and training overlap)."""


PRESETS = {
    "default": Preset("default"),
    "quick": Preset(
        "quick",
        sft_rows=48,
        rank_prompts=16,
        rm_epochs=1,
        rl_steps=3,
        prompts_per_step=4,
        max_new_tokens=40,
        user_pause_s=1.0,
        eval_prompts=16,
        # Too few pairs to show an accuracy change: quick publishes what its refresh made.
        refresh={
            "refresh_every": 4,
            "min_held_out": 1,
            "held_out_modulus": 3,
            "epochs": 1,
            "learning_rate": 3e-5,
            "tolerance": 1.0,
        },
    ),
    "gpu": Preset(
        "gpu",
        sft_rows=0,
        sft_epochs=2,
        rank_prompts=300,
        rl_steps=80,
        prompts_per_step=16,
        max_new_tokens=96,
        users=4,
        user_pause_s=1.0,
    ),
}


def fast_dtype() -> str:
    """bfloat16 where it is fast (CUDA; a CPU with AMX tiles), else float32."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bfloat16" if amx() else "float32"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


class Console:
    """Stage headers and one status line per event, with the time since the demo started."""

    def __init__(self):
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stage(self, title: str) -> float:
        print(f"\n== [{self.now():6.0f}s] {title}", flush=True)
        return time.monotonic()

    def line(self, text: str) -> None:
        print(f"   [{self.now():6.0f}s] {text}", flush=True)


def rlhf(stage: str, args: list[str], log: Path) -> dict:
    """Runs one `rlhf` stage as a user would; its JSON summary (stdout) is returned."""
    cmd = [sys.executable, "-m", "services.cli", stage, *args]
    with open(log, "w") as err:
        done = subprocess.run(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"rlhf {stage} failed ({done.returncode}); see {log}:\n{log.read_text()[-3000:]}"
        )
    return json.loads(done.stdout)


# -- stage 2: rankings through the gateway ---------------------------------------------------------


def chat_prompt(question: str):
    from services.genproto.rlhf.v1 import common_pb2

    return common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content=question)]
        )
    )


def sample_groups(
    address: str, questions: list[str], k: int, max_new_tokens: int, seed: int, per_call: int = 8
):
    """K answers of the served policy to each question: [(question, [answer, ...]), ...]."""
    from services.genproto.rlhf.v1 import policy_pb2, policy_pb2_grpc

    groups = []
    with grpc.insecure_channel(address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for start in range(0, len(questions), per_call):
            batch = questions[start : start + per_call]
            sampling = policy_pb2.SamplingParams(
                n=k,
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                top_p=1.0,
                seed=seed + start,
                has_seed=True,
            )
            reply = stub.Generate(
                policy_pb2.GenerateRequest(
                    prompts=[chat_prompt(q) for q in batch], sampling=sampling
                ),
                timeout=600,
            )
            for completion in sorted(reply.completions, key=lambda c: c.prompt_index):
                groups.append(
                    (batch[completion.prompt_index], [s.text.strip() for s in completion.samples])
                )
    return groups


def post_rankings(stack: Stack, annotator: Annotator, groups) -> tuple[int, int]:
    """Ranks each group with the annotator and posts it to /v1/rankings; (rankings, pairs)."""
    rankings = pairs = 0
    for question, answers in groups:
        distinct = [a for a in dict.fromkeys(answers) if a]
        if len(distinct) < 2:
            continue
        ranked = [distinct[i] for i in annotator.rank(question, distinct)]
        body = {
            "prompt": question,
            "responses": ranked,
            "idempotency_key": f"rank-{uuid.uuid4().hex}",
        }
        http_json("POST", f"{stack.gateway_url}/v1/rankings", body, stack.api_key)
        rankings += 1
        pairs += len(ranked) * (len(ranked) - 1) // 2
    return rankings, pairs


def read_pairs(bootstrap: str, expected: int, timeout_s: float = 120) -> list[dict]:
    """The preference pairs on rlhf.preferences.v1, read back as the reward trainer's rows."""
    from services.common import topics
    from services.common.kafka import decode, make_consumer
    from services.common.settings import KafkaSettings
    from services.genproto.rlhf.v1 import events_pb2

    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="demo-export")
    consumer = make_consumer(settings, f"demo-export-{uuid.uuid4().hex[:8]}", [topics.PREFERENCES])
    rows: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(rows) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    record = decode(events_pb2.PreferenceRecord, r.value)
                    if record.WhichOneof("kind") == "pair":
                        rows[record.preference_id] = {
                            "prompt": record.prompt,
                            "chosen": record.pair.chosen,
                            "rejected": record.pair.rejected,
                        }
    finally:
        consumer.close()
    if len(rows) < expected:
        raise RuntimeError(f"{len(rows)} of {expected} preference pairs came back from Kafka")
    return list(rows.values())


# -- stage 3: users, and what the loop does ----------------------------------------------------------


class Users(threading.Thread):
    """People chatting through the gateway with the official openai client: each asks a question
    for `n` answers and presses thumbs up or down on each by the annotator's judgement (the
    curator pairs every up with every down of one prompt)."""

    def __init__(
        self,
        stack: Stack,
        annotator: Annotator,
        questions: list[str],
        console: Console,
        index: int,
        max_tokens: int,
        pause_s: float,
        events: list,
        seed: int,
    ):
        super().__init__(name=f"user-{index}", daemon=True)
        import openai

        self.client = openai.OpenAI(
            base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, timeout=300, max_retries=2
        )
        self.stack, self.annotator, self.questions, self.console = (
            stack,
            annotator,
            questions,
            console,
        )
        self.max_tokens, self.pause_s, self.events = max_tokens, pause_s, events
        self.random = random.Random(seed * 1000 + index)
        self.stopping = threading.Event()
        self.errors = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            question = self.random.choice(self.questions)
            try:
                reply = self.client.chat.completions.create(
                    model="policy",
                    messages=[{"role": "user", "content": question}],
                    n=4,
                    max_tokens=self.max_tokens,
                    temperature=1.0,
                )
                self.events.append({"t_s": self.console.now(), "kind": "chat"})
                for choice in reply.choices:
                    thumb = self.annotator.thumb(question, choice.message.content or "")
                    response_id = choice.model_extra.get("response_id") or reply.id
                    http_json(
                        "POST",
                        f"{self.stack.gateway_url}/v1/feedback",
                        {"response_id": response_id, "thumb": thumb},
                        self.stack.api_key,
                    )
                    self.events.append({"t_s": self.console.now(), "kind": f"thumbs_{thumb}"})
            except Exception as err:  # noqa: BLE001 - a user who fails tries again later
                self.errors += 1
                if self.errors <= 3:
                    self.console.line(f"user {self.name}: {type(err).__name__}: {str(err)[:160]}")
            self.stopping.wait(self.pause_s)


class RolloutTail(threading.Thread):
    """Reads every rollout from rlhf.rollouts.v1 and scores it with the annotator: the gold score
    beside the reward model's, and the reward-model version that scored it."""

    def __init__(self, bootstrap: str, annotator: Annotator):
        super().__init__(name="rollout-tail", daemon=True)
        from services.common import topics
        from services.common.kafka import make_consumer
        from services.common.settings import KafkaSettings

        self.consumer = make_consumer(
            KafkaSettings(bootstrap_servers=bootstrap, client_id="demo-tail"), None
        )
        self.topic = topics.ROLLOUTS
        self.annotator = annotator
        self.by_id: dict[str, dict] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        from kafka import TopicPartition

        from services.common.kafka import decode
        from services.common.prompts import render_prompt
        from services.genproto.rlhf.v1 import events_pb2

        parts = wait_for(
            lambda: self.consumer.partitions_for_topic(self.topic), 120, what="the rollouts topic"
        )
        self.consumer.assign([TopicPartition(self.topic, p) for p in parts])
        self.consumer.seek_to_beginning()
        while not self.stopping.is_set():
            for records in self.consumer.poll(timeout_ms=500).values():
                for r in records:
                    rollout = decode(events_pb2.Rollout, r.value)
                    prompt = render_prompt(rollout.prompt)
                    self.by_id[rollout.rollout_id] = {
                        "gold": self.annotator.score(prompt, rollout.response_text),
                        "reward": rollout.reward,
                        "reward_model_version": rollout.reward_model_version,
                    }
        self.consumer.close()


def trainer_updates(metrics_log: Path) -> list[dict]:
    if not metrics_log.exists():
        return []
    return [
        r
        for r in map(json.loads, metrics_log.read_text().splitlines())
        if r.get("event") == "update"
    ]


def refreshes(log_file: Path, console_t0_unix: float) -> list[dict]:
    """The refresh's decisions, from its JSON log lines."""
    out = []
    if not log_file.exists():
        return out
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("msg") != "refresh":
            continue
        stamp = calendar.timegm(time.strptime(entry["ts"][:19], "%Y-%m-%dT%H:%M:%S"))  # UTC
        out.append(
            {
                "t_s": stamp - console_t0_unix,
                "version": entry.get("version"),
                "published": entry.get("published"),
                "accuracy_before": entry.get("accuracy_before"),
                "accuracy_after": entry.get("accuracy_after"),
                "new_pairs": entry.get("new_pairs"),
            }
        )
    return out


def step_record(update: dict, tail: RolloutTail, t_s: float) -> dict:
    seen = [tail.by_id[i] for i in update.get("rollout_ids", []) if i in tail.by_id]
    versions = sorted({s["reward_model_version"] for s in seen})
    return {
        "step": update["step"],
        "t_s": t_s,
        "weights_version": update["weights_version"],
        "reward_model_version": versions[-1] if versions else None,
        "reward_model_versions": versions,
        "reward_mean": update.get("reward/mean"),
        "gold_mean": sum(s["gold"] for s in seen) / len(seen) if seen else None,
        "kl": update.get("kl/behaviour_ref_k1"),
        "kl_coef": update.get("kl/coef"),
        "rollouts": len(update.get("rollout_ids", [])),
        "length_mean": update.get("response/length_mean"),
    }


def assemble_policy(sft_dir: Path, weights: Path, out: Path) -> Path:
    """A model folder of the trained policy: the SFT folder's config and tokenizer, the trainer's
    last published weights."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(
        sft_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "training_summary.json")
    )
    shutil.copy2(weights / "model.safetensors", out / "model.safetensors")
    return out


def keep_models(sft_dir: Path, reward_dir: Path, keep: Path) -> None:
    """The SFT policy and the stage-2 reward model, for `make up` (models/demo/)."""
    for source, name in ((sft_dir, "sft"), (reward_dir, "reward")):
        target = keep / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


# -- the run -----------------------------------------------------------------------------------------


def run(
    preset: Preset,
    annotator_spec: str,
    algorithm: str,
    seed: int,
    report_dir: Path,
    state: Path = STATE,
    keep: Path = DEMO_MODELS,
) -> dict:
    console = Console()
    started_unix = time.time()
    annotator = load_annotator(annotator_spec)  # a bad name fails here, before anything starts
    dtype = fast_dtype() if preset.dtype == "auto" else preset.dtype
    Stack.stop_folder(state)  # an interrupted earlier demo
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    work = state / "work"
    work.mkdir()
    rng = random.Random(seed)
    report: dict = {
        "preset": preset.name,
        "seed": seed,
        "algorithm": algorithm,
        "annotator": annotator_spec,
        "dtype": dtype,
        "schedule": asdict(preset),
        "stages": {},
    }
    print(
        f"RLHF demo: preset {preset.name}, {algorithm}, annotator {annotator_spec}, seed {seed}, {dtype}"
    )

    threads = preset.threads or max(1, (os.cpu_count() or 2) // 2)
    stack = Stack(state, dtype=dtype, threads=threads)
    try:
        # The broker and Triton boot while SFT trains (the JVM and Triton wait on I/O mostly).
        core = threading.Thread(target=stack.start_core, name="core", daemon=True)
        core.start()

        # 1. SFT ------------------------------------------------------------------------------
        t = console.stage("stage 1: SFT on demonstrations (rlhf sft)")
        demos = read_jsonl(DATA / "sft.jsonl")
        if preset.sft_rows:
            demos = demos[: preset.sft_rows]
        sft_dir = work / "sft"
        summary = rlhf(
            "sft",
            [
                "--model",
                str(BASE_MODEL),
                "--data",
                str(write_jsonl(work / "sft.jsonl", demos)),
                "--output",
                str(sft_dir),
                "--set",
                f"epochs={preset.sft_epochs}",
                "--set",
                f"learning_rate={preset.sft_lr}",
                "--set",
                f"dtype={dtype}",
                "--set",
                f"seed={seed}",
                "--set",
                "max_length=384",
            ],
            work / "sft.log",
        )
        m = summary["metrics"]
        report["stages"]["sft"] = {
            "eval_loss_before": m.get("eval/loss_before"),
            "eval_loss_after": m.get("eval/loss_after"),
            "rows": len(demos),
            "seconds": time.monotonic() - t,
        }
        console.line(
            f"held-out loss {m.get('eval/loss_before'):.3f} -> {m.get('eval/loss_after'):.3f} ({len(demos)} demonstrations)"
        )

        # 2. Reward model from rankings --------------------------------------------------------
        t = console.stage(
            f"stage 2: the SFT policy answers K={preset.k} times, the annotator ranks, /v1/rankings, rlhf train-reward"
        )
        core.join()
        stack.start_policy(sft_dir)
        stack.wait_serving(("policy",))
        stack.start_gateway()
        stack.start_curator()
        console.line(
            f"kafka {stack.broker.bootstrap_servers}, triton {stack.triton.grpc_url}, policy {stack.address('policy')}, gateway {stack.gateway_url}"
        )
        questions = [r["prompt"] for r in read_jsonl(DATA / "prompts_train.jsonl")]
        rng.shuffle(questions)
        groups = sample_groups(
            stack.address("policy"),
            questions[: preset.rank_prompts],
            preset.k,
            preset.max_new_tokens,
            seed,
        )
        rankings, expected_pairs = post_rankings(stack, annotator, groups)
        console.line(
            f"{rankings} rankings posted to {stack.gateway_url}/v1/rankings = {expected_pairs} pairs"
        )
        pairs = read_pairs(stack.broker.bootstrap_servers, expected_pairs)
        # Held out by the refresh's own rule, so that its held-out set is this one plus live pairs.
        modulus = preset.refresh["held_out_modulus"]
        held_out = [p for p in pairs if is_held_out(p["prompt"], modulus)]
        train = [p for p in pairs if not is_held_out(p["prompt"], modulus)]
        reward_dir = work / "reward-v1"
        summary = rlhf(
            "train-reward",
            [
                "--data",
                str(write_jsonl(work / "pairs-train.jsonl", train)),
                "--eval-data",
                str(write_jsonl(work / "pairs-held-out.jsonl", held_out)),
                "--output",
                str(reward_dir),
                "--set",
                f"epochs={preset.rm_epochs}",
                "--set",
                f"learning_rate={preset.rm_lr}",
                "--set",
                f"seed={seed}",
            ],
            work / "train-reward.log",
        )
        m = summary["metrics"]
        report["stages"]["reward"] = {
            "held_out_accuracy": m.get("eval/accuracy_after"),
            "held_out_accuracy_before": m.get("eval/accuracy_before"),
            "rankings": rankings,
            "pairs": len(pairs),
            "seconds": time.monotonic() - t,
        }
        console.line(
            f"reward model: held-out pairwise accuracy {m.get('eval/accuracy_before'):.3f} -> {m.get('eval/accuracy_after'):.3f}"
        )

        # 3. Online RL with the live loop ------------------------------------------------------
        batch = preset.prompts_per_step * preset.samples_per_prompt
        t = console.stage(
            f"stage 3: online {algorithm.upper()} x{preset.rl_steps} (batch {batch}), users chatting, reward-model refresh"
        )
        versions_root = work / "reward-versions"
        stack.start_reward(reward_dir, versions_root)
        stack.start_reference(sft_dir)
        stack.wait_serving(("reward", "reference"))
        # The stage-2 pairs on the topic trained version 1: the refresh keeps them as held-out
        # and replay data, and refreshes on what users say from now on.
        stack.start_refresh(
            reward_dir, versions_root, seed=seed, base_trained_on_existing=True, **preset.refresh
        )
        tail = RolloutTail(stack.broker.bootstrap_servers, annotator)
        tail.start()
        rl_prompts = write_jsonl(
            work / "rl-prompts.jsonl",
            [{"messages": [{"role": "user", "content": q}]} for q in questions],
        )
        learner = {"seed": seed, **preset.learner}
        stack.start_trainer(sft_dir, algorithm, batch, preset.rl_steps, learner)
        stack.start_rollout(
            rl_prompts,
            preset.samples_per_prompt,
            preset.prompts_per_step,
            preset.max_new_tokens,
            batch * preset.rl_steps,
            seed=seed,
            max_staleness=1,
            # The trainer uses a batch per version (push_every 1): the worker counts versions by it,
            # and with its default (8) it took one batch in training for several versions ahead
            # and never generated the next batch beside the update.
            rollouts_per_version=batch,
        )
        user_questions = [r["prompt"] for r in read_jsonl(DATA / "prompts_users.jsonl")]
        events: list[dict] = []
        users = [
            Users(
                stack,
                annotator,
                user_questions,
                console,
                i,
                preset.max_new_tokens,
                preset.user_pause_s,
                events,
                seed,
            )
            for i in range(preset.users)
        ]
        for u in users:
            u.start()
        steps: list[dict] = []
        metrics_log = state / "trainer" / "metrics.jsonl"
        trainer = stack.daemons["trainer"]
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            done = trainer.pid is None
            for update in trainer_updates(metrics_log)[len(steps) :]:
                if not all(i in tail.by_id for i in update.get("rollout_ids", [])):
                    time.sleep(1.0)  # the tail has not read this batch yet
                steps.append(step_record(update, tail, console.now()))
                console.line(report_mod.status_line(steps[-1], of=preset.rl_steps))
            if done:
                break
            time.sleep(1.0)
        if len(steps) < preset.rl_steps:
            raise RuntimeError(
                f"the trainer stopped after {len(steps)} of {preset.rl_steps} steps; see {trainer.log_file}"
            )
        # The refresh publishes on its own schedule: users go on until one is published, for at
        # most refresh_wait_s after the last step. A rule whose thumbs make too few pairs, or a
        # refresh that lowers held-out accuracy, publishes nothing: the report says so, and the
        # run is still evaluated (waiting 600 s and failing threw away a 17-minute run).
        refresh_log = state / "refresh.log"
        try:
            wait_for(
                lambda: any(r["published"] for r in refreshes(refresh_log, started_unix)),
                preset.refresh_wait_s,
                2.0,
                "a published reward-model refresh",
            )
        except TimeoutError:
            made = refreshes(refresh_log, started_unix)
            console.line(
                f"no reward-model refresh published within {preset.refresh_wait_s:.0f}s of the last "
                f"step ({len(made)} ran, none kept): every rollout was scored by version 1"
            )
        for u in users:
            u.stopping.set()
        for u in users:
            u.join(timeout=15)  # mid-chat they are stopped with the stack
        tail.stopping.set()
        report["steps"] = steps
        report["refreshes"] = refreshes(refresh_log, started_unix)
        report["feedback"] = sorted(events, key=lambda e: e["t_s"])
        report["reward_model_versions"] = sorted(
            {v for s in steps for v in s["reward_model_versions"]}
        )
        report["stages"]["rl"] = {
            "steps": len(steps),
            "seconds": time.monotonic() - t,
            "chats": sum(e["kind"] == "chat" for e in events),
        }
        for r in report["refreshes"]:
            console.line(
                f"refresh -> v{r['version']} {'published' if r['published'] else 'rejected'}: "
                f"held-out accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} on {r['new_pairs']} new pairs"
            )
        final_version = steps[-1]["weights_version"]
        weights = state / "trainer" / "weights" / f"v{final_version:08d}"
        if not weights.is_dir():
            weights = max((state / "trainer" / "weights").glob("v*"))
        stack.stop()  # the services are done: the evaluation has the machine to itself

        # 4. Evaluation ------------------------------------------------------------------------
        t = console.stage("stage 4: rlhf eval on held-out prompts, judged by the annotator")
        final_dir = assemble_policy(sft_dir, weights, work / "final")
        eval_rows = read_jsonl(DATA / "prompts_eval.jsonl")[: preset.eval_prompts]
        eval_data = write_jsonl(work / "eval-prompts.jsonl", eval_rows)
        common = [
            "--data",
            str(eval_data),
            "--annotator",
            annotator_spec,
            "--set",
            f"max_new_tokens={preset.max_new_tokens}",
            "--set",
            f"seed={seed}",
            "--set",
            f"dtype={dtype}",
            "--set",
            "examples=100",
            "--set",  # the second run reads the candidate's answers and KL back from the first
            f"answers_cache={work / 'eval-answers'}",
        ]
        vs_sft = rlhf(
            "eval",
            [
                "--candidate",
                str(final_dir),
                "--baseline",
                str(sft_dir),
                "--reference",
                str(sft_dir),
                "--output",
                str(work / "eval-vs-sft"),
                *common,
            ],
            work / "eval-vs-sft.log",
        )
        vs_base = rlhf(
            "eval",
            [
                "--candidate",
                str(final_dir),
                "--baseline",
                str(BASE_MODEL),
                "--reference",
                str(sft_dir),
                "--output",
                str(work / "eval-vs-base"),
                *common,
            ],
            work / "eval-vs-base.log",
        )
        full_sft = json.loads((work / "eval-vs-sft" / "eval.json").read_text())
        full_base = json.loads((work / "eval-vs-base" / "eval.json").read_text())
        ms, mb = vs_sft["metrics"], vs_base["metrics"]
        report["eval_vs_sft"] = {k: v for k, v in full_sft.items() if k != "examples"}
        report["eval_vs_base"] = {k: v for k, v in full_base.items() if k != "examples"}
        report.update(
            {
                "win_rate_vs_sft": ms["win_rate"],
                "win_rate_vs_sft_ci_low": ms["win_rate_ci_low"],
                "win_rate_vs_sft_ci_high": ms["win_rate_ci_high"],
                "win_rate_vs_base": mb["win_rate"],
                "win_rate_vs_base_ci_low": mb["win_rate_ci_low"],
                "win_rate_vs_base_ci_high": mb["win_rate_ci_high"],
                "kl_to_reference": ms["kl_to_reference"],
                "kl_budget": preset.kl_budget,
                "kl_within_budget": ms["kl_to_reference"] is not None
                and ms["kl_to_reference"] <= preset.kl_budget,
            }
        )
        report["examples"] = [
            {
                "prompt": e["prompt"],
                "before": e["baseline"],
                "after": e["candidate"],
                "before_score": e.get("baseline_score"),
                "after_score": e.get("candidate_score"),
            }
            for e in full_sft.get("examples", [])[:5]
        ]
        report["stages"]["eval"] = {"seconds": time.monotonic() - t, "prompts": len(eval_rows)}
        keep_models(sft_dir, reward_dir, keep)
        console.line(
            f"final vs SFT:  win-rate {ms['win_rate']:.3f} [{ms['win_rate_ci_low']:.3f}, {ms['win_rate_ci_high']:.3f}]"
            f"  judge {ms['candidate_score_mean']:.3f} vs {ms['baseline_score_mean']:.3f}  KL {ms['kl_to_reference']:.2f} nats"
            f" (budget {preset.kl_budget})"
        )
        console.line(
            f"final vs base: win-rate {mb['win_rate']:.3f} [{mb['win_rate_ci_low']:.3f}, {mb['win_rate_ci_high']:.3f}]"
            f"  judge {mb['candidate_score_mean']:.3f} vs {mb['baseline_score_mean']:.3f}"
        )
    finally:
        stack.stop()
        Stack.stop_folder(state)

    # 5. Report --------------------------------------------------------------------------------
    report["wall_s"] = console.now()
    index = report_mod.write_report(report, report_dir)
    console.stage(f"report: {index} ({report['wall_s']:.0f}s in all)")
    left = Stack.alive_in(state)
    if left:
        raise RuntimeError(f"processes left running: {left}")
    return report


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument(
        "--annotator",
        default=DEFAULT_ANNOTATOR,
        help="module:function, score(prompt, answer) -> float",
    )
    parser.add_argument("--algorithm", choices=["ppo", "grpo", "rloo"], default="ppo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-dir", type=Path, default=REPO_ROOT / "demo-report")
    parser.add_argument(
        "--state", type=Path, default=STATE, help="folder of the run's processes, logs and models"
    )
    parser.add_argument(
        "--keep-models",
        type=Path,
        default=DEMO_MODELS,
        help="where the SFT and reward models are kept for `make up`",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a preset field (JSON value)",
    )
    options = parser.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so that every process is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    preset = PRESETS[options.preset]
    for item in options.set:
        key, _, value = item.partition("=")
        if key not in Preset.__dataclass_fields__:
            parser.error(
                f"--set {key}: not a preset field ({', '.join(Preset.__dataclass_fields__)})"
            )
        preset = replace(preset, **{key: json.loads(value)})
    run(
        preset,
        options.annotator,
        options.algorithm,
        options.seed,
        options.report_dir,
        options.state,
        options.keep_models,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
