"""`rlhf cai-sft`: Constitutional AI's supervised stage. The policy answers each prompt, critiques
its own answer against one principle of the constitution, then revises it; the revisions are the
SFT data (TRL's conversational format, which `rlhf sft` reads).

    python -m services.cli cai-sft --policy localhost:50051 \
        --prompts deploy/local/data/red_team_prompts.jsonl \
        --constitution services/judge/constitutions/v1.yaml --output runs/cai-sft.jsonl --seed 0

1. Check the input: the constitution (services.judge.rubric), every prompt row ({"prompt": text}
   or {"messages": [...]}), the policy address. Bad input raises ConfigError / DataError here.
2. Draw one principle per prompt with `random.Random(seed)`, in file order: the same seed and
   files give the same principles.
3. Through the PolicyService (one Generate per batch of `batch_size` prompts; prompt k of step
   s = 0, 1, 2 is sampled with seed + s + k, k counting the prompts still in play):
   a. the answer to the prompt;
   b. the critique: the conversation so far plus the principle's critique request;
   c. the revision: the conversation so far plus the principle's revision request.
4. Write one row per prompt, atomically (a temporary sibling, then a rename):
   {"messages": [...prompt, {"role": "assistant", "content": REVISION}], "critique": ...,
    "principle": NAME, "initial": ANSWER, "constitution_version": VERSION}.
   A prompt whose answer, critique or revision comes back empty has no row (counted as
   `skipped_empty`): an empty turn is neither a demonstration nor a valid next request.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.training.data import DataError, read_rows
from services.common.training.stage import ConfigError
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.judge.rubric import DEFAULT_CONSTITUTION, Principle, RubricError, load_constitution

ROLES = ("system", "user", "assistant")
GRPC_SCHEME = "grpc://"
Messages = list[dict[str, str]]


@dataclass(kw_only=True)
class CaiSftConfig:
    policy: str
    """The PolicyService that answers, critiques and revises: host:port (or grpc://host:port)."""
    prompts: Path
    """JSONL of prompts, one a line: {"prompt": "a request"} or {"messages": [{role, content}]}."""
    output: Path
    """JSONL file of the SFT rows (written atomically)."""
    constitution: Path = DEFAULT_CONSTITUTION
    """Constitution YAML (version, principles: name, rule, critique, revision)."""
    seed: int = 0
    """Seed of the principle drawn for each prompt and of the policy's sampling."""
    num_prompts: int = 0
    """Use the first N prompts (0: all)."""
    max_new_tokens: int = 96
    """Upper bound on the tokens of each answer, critique and revision."""
    temperature: float = 0.0
    """Sampling temperature of the policy (0: greedy)."""
    batch_size: int = 8
    """Prompts per Generate request."""
    timeout_s: float = 600.0
    """Deadline of one Generate request."""


@dataclass(frozen=True)
class CaiRow:
    messages: Messages
    critique: str
    principle: str
    initial: str
    constitution_version: str

    def as_json(self) -> dict:
        return {
            "messages": self.messages,
            "critique": self.critique,
            "principle": self.principle,
            "initial": self.initial,
            "constitution_version": self.constitution_version,
        }


def policy_target(field: str, address: str) -> str:
    """host:port of a `policy` value; ConfigError when it is not one."""
    target = address.removeprefix(GRPC_SCHEME)
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config field '{field}': {address!r} is not host:port")
    return target


def parse_prompt(row: dict, where: str) -> Messages:
    """The conversation of one prompt row; DataError names the line and the problem."""
    if ("prompt" in row) == ("messages" in row):
        raise DataError(f"{where}: expected one of 'prompt' or 'messages', got {sorted(row)}")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        return [{"role": "user", "content": prompt}]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    checked = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: messages[{i}].content must be a non-empty string")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be the user's request")
    return checked


def load_prompts(path: Path, limit: int = 0) -> list[Messages]:
    prompts = []
    for where, row in read_rows(path):
        if limit and len(prompts) == limit:
            break
        prompts.append(parse_prompt(row, where))
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    return prompts


def draw_principles(principles: tuple[Principle, ...], n: int, seed: int) -> list[Principle]:
    """One principle per prompt, in prompt order, from `random.Random(seed)`."""
    rng = random.Random(seed)
    return [rng.choice(principles) for _ in range(n)]


def wire_prompt(messages: Messages) -> common_pb2.Prompt:
    turns = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=turns))


class PolicyClient:
    """One Generate per batch of conversations; prompt i of a call is sampled with seed + i."""

    def __init__(self, target: str, config: CaiSftConfig):
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.config = config

    def answer(self, conversations: list[Messages], seed: int) -> list[str]:
        c = self.config
        texts: list[str] = []
        for start in range(0, len(conversations), c.batch_size):
            batch = conversations[start : start + c.batch_size]
            sampling = policy_pb2.SamplingParams(
                n=1,
                max_new_tokens=c.max_new_tokens,
                temperature=c.temperature,
                seed=seed + start,
                has_seed=True,
            )
            request = policy_pb2.GenerateRequest(
                prompts=[wire_prompt(m) for m in batch], sampling=sampling
            )
            try:
                response = self.stub.Generate(request, timeout=c.timeout_s)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise DataError(f"the policy refused a prompt: {err.details()}") from err
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    raise ConfigError(
                        f"config field 'policy': no PolicyService at {c.policy}: {err.details()}"
                    ) from err
                raise
            texts += [completion.samples[0].text.strip() for completion in response.completions]
        return texts

    def close(self) -> None:
        self.channel.close()


def critique_and_revise(
    policy: PolicyClient,
    prompts: list[Messages],
    principles: list[Principle],
    seed: int,
    version: str,
) -> tuple[list[CaiRow], int]:
    """Steps 3a-c on all prompts at once (each step one pass over the batches); returns the rows
    and the number of prompts skipped for an empty turn."""
    initial = policy.answer(prompts, seed)  # 3a
    asked = [
        p + [{"role": "assistant", "content": a}, {"role": "user", "content": pr.critique}]
        for p, a, pr in zip(prompts, initial, principles)
    ]
    alive = [i for i, a in enumerate(initial) if a]
    critiques = dict(zip(alive, policy.answer([asked[i] for i in alive], seed + 1)))  # 3b
    alive = [i for i in alive if critiques[i]]
    revise = [
        asked[i]
        + [
            {"role": "assistant", "content": critiques[i]},
            {"role": "user", "content": principles[i].revision},
        ]
        for i in alive
    ]
    revisions = dict(zip(alive, policy.answer(revise, seed + 2)))  # 3c
    rows = [
        CaiRow(
            messages=prompts[i] + [{"role": "assistant", "content": revisions[i]}],
            critique=critiques[i],
            principle=principles[i].name,
            initial=initial[i],
            constitution_version=version,
        )
        for i in alive
        if revisions[i]
    ]
    return rows, len(prompts) - len(rows)


def write_rows(path: Path, rows: list[CaiRow]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with staging.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row.as_json(), ensure_ascii=False) + "\n")
    os.replace(staging, path)


def run_cai_sft(config: CaiSftConfig) -> dict:
    started = time.time()
    # 1. Input.
    for name, ok in {
        "num_prompts": config.num_prompts >= 0,
        "max_new_tokens": config.max_new_tokens >= 1,
        "temperature": config.temperature >= 0,
        "batch_size": config.batch_size >= 1,
        "seed": config.seed >= 0,
        "timeout_s": config.timeout_s > 0,
    }.items():
        if not ok:
            raise ConfigError(
                f"config field '{name}' has an invalid value {getattr(config, name)!r}"
            )
    try:
        constitution = load_constitution(config.constitution)
    except RubricError as err:
        raise ConfigError(f"config field 'constitution': {err}") from err
    prompts = load_prompts(config.prompts, config.num_prompts)
    target = policy_target("policy", config.policy)
    # 2. Principles.
    principles = draw_principles(constitution.principles, len(prompts), config.seed)
    # 3. Answer, critique, revise.
    policy = PolicyClient(target, config)
    try:
        rows, skipped = critique_and_revise(
            policy, prompts, principles, config.seed, constitution.version
        )
    finally:
        policy.close()
    # 4. The rows.
    write_rows(config.output, rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.principle] = counts.get(row.principle, 0) + 1
    return {
        "stage": "cai-sft",
        "constitution_version": constitution.version,
        "principles": counts,
        "metrics": {
            "prompts": len(prompts),
            "rows": len(rows),
            "skipped_empty": skipped,
            "revised_changed": sum(1 for r in rows if r.messages[-1]["content"] != r.initial),
            "seconds": round(time.time() - started, 3),
        },
    }
