"""`rlhf eval`: the win-rate of a candidate policy over a baseline on a set of prompts, judged
pairwise by an annotator that is not the reward model, with the candidate's KL to a reference.

    python -m services.cli eval --candidate runs/rl-1 --baseline runs/sft-1 \
        --data prompts.jsonl --output runs/eval-1
    python -m services.cli eval --candidate grpc://localhost:50051 --baseline runs/sft-1 ...

1. Check the input: config fields, every prompt row, the annotator, the policies' forms (a model
   folder or grpc://host:port, see policies.py) and chat templates. Bad input raises EvalError
   here, before any model loads.
2. Generate one answer per prompt from the candidate, batch by batch, with the seeds the
   baseline will get for the same prompts.
   With `answers_cache`, answers a previous run kept for the same policy, prompts and
   sampling are read back instead (the policy's weights never load).
3. KL(candidate || reference) on the candidate's own answers while it is loaded (or kept). It needs both
   full next-token distributions, so both must be folders with one vocabulary: the default
   reference (the baseline) gives null when either side is served over gRPC.
4. Generate the baseline's answers.
5. Score every answer, and judge each pair in a random order (stats.compare): by the
   annotator's scores, or, with `judge`, by a JudgeService's verdicts (judge.py).
6. Write eval.json (the summary) to the output folder, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.annotator import DEFAULT_ANNOTATOR, AnnotatorError, load_annotator
from services.common.annotator_rules import words
from services.common.digest import sha256_file
from services.common.prompts import render_messages
from services.eval.judge import JudgeError, ServiceJudge
from services.eval.policies import (
    GRPC_SCHEME,
    Answer,
    FolderPolicy,
    Policy,
    PolicyError,
    Sampling,
    ServicePolicy,
    generate_all,
    kl_to_reference,
)
from services.eval.stats import compare

EVAL_FILE = "eval.json"
ROLES = ("system", "user", "assistant")


class EvalError(ValueError):
    """Bad input to `rlhf eval`; the message names the file and row, or the config field."""


@dataclass(kw_only=True)
class EvalConfig:
    candidate: str
    """Policy under test: a model folder, or `grpc://host:port` of a running PolicyService."""
    baseline: str
    """Policy it is compared with (e.g. the one RL started from), in the same two forms."""
    data: Path
    """JSONL of prompts, one a line: {"prompt": "a question"} or {"messages": [{role, content}]}."""
    output: Path
    """Folder to write eval.json (the summary) to."""
    reference: str | None = None
    """Model folder for kl_to_reference; default: the baseline when it is a folder, else no KL."""
    annotator: str = DEFAULT_ANNOTATOR
    """The judge, `module:function` scoring (prompt, answer); see services/common/annotator.py."""
    judge: str | None = None
    """`[grpc://]host:port` of a JudgeService (services/judge: an AI judge by a rubric or a
    constitution): the pairwise verdicts come from it (both orders asked), while the annotator
    still gives each answer's score. None: the annotator's scores decide the pairs too."""
    num_prompts: int = 0
    """Evaluate the first N prompts of `data` (0: all)."""
    max_new_tokens: int = 64
    """Upper bound on the tokens of each answer."""
    temperature: float = 0.7
    """Sampling temperature of both policies (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass of both policies, in (0, 1]."""
    seed: int = 0
    """Seed of the sampling (the same for both policies on a prompt) and of the judging order."""
    batch_size: int = 32
    """Prompts per generate call (per Generate request to a PolicyService)."""
    device: str = "auto"
    """Device of the model folders: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """Weights dtype of the model folders: `auto` (bfloat16 on CUDA, float32 on CPU), `float32`,
    `bfloat16`."""
    examples: int = 5
    """Judged prompts copied into eval.json, with both answers and their scores."""
    overwrite: bool = False
    """Replace an existing eval.json in `output` (otherwise its presence is an error)."""
    answers_cache: Path | None = None
    """Folder that keeps each policy's answers (and the candidate's KL) between runs, keyed by
    the policy (a folder by its files' names, sizes and mtimes; a service by address, model and
    weights version), the prompts' sha256 and the sampling settings. A later eval of the same
    policy on the same prompts reuses them and never loads its weights: one candidate judged
    against two baselines generates its answers once. None: nothing is kept."""

    def validate(self) -> None:
        """Raises EvalError naming the first bad field."""
        checks = {
            "num_prompts": self.num_prompts >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "seed": self.seed >= 0,
            "batch_size": self.batch_size >= 1,
            "dtype": self.dtype in ("auto", "float32", "bfloat16"),
            "examples": self.examples >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise EvalError(
                    f"config field '{name}' has an invalid value {getattr(self, name)!r}"
                )
        if (Path(self.output) / EVAL_FILE).exists() and not self.overwrite:
            raise EvalError(
                f"config field 'output': {Path(self.output) / EVAL_FILE} exists "
                "(set overwrite: true to replace it)"
            )


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class EvalPrompt:
    messages: list[dict[str, str]]
    """The conversation the policies continue, through their chat template."""
    question: str
    """What the judge reads: the prompt string, or the content of the last user turn."""


def parse_prompt(row: dict, where: str) -> EvalPrompt:
    if ("prompt" in row) == ("messages" in row):
        raise EvalError(f"{where}: expected one of 'prompt' or 'messages', got {sorted(row)}")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.80}")
        return EvalPrompt([{"role": "user", "content": prompt}], prompt)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise EvalError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise EvalError(f"{where}: messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise EvalError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise EvalError(f"{where}: messages[{i}].content must be a non-empty string")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in checked):
        raise EvalError(f"{where}: 'messages' has no user turn for the judge to read")
    # The judge reads the conversation as the reward model and the preference records do.
    return EvalPrompt(checked, render_messages([(m["role"], m["content"]) for m in checked]))


def load_prompts(path: Path, limit: int = 0) -> list[EvalPrompt]:
    """The first `limit` prompts of a JSONL file (0: all); EvalError names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"config field 'data': {path}: no such data file")
    prompts = []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if limit and len(prompts) == limit:
                    break
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    message = f"{where}: not valid JSON ({err.msg} at column {err.colno})"
                    raise EvalError(message) from err
                if not isinstance(row, dict):
                    raise EvalError(f"{where}: expected a JSON object, got {type(row).__name__}")
                prompts.append(parse_prompt(row, where))
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not prompts:
        raise EvalError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------------------------------------
# Policies


def open_policy(field: str, spec: str, config: EvalConfig, opened: dict[str, Policy]) -> Policy:
    """The policy a config field names; a folder named by several fields is loaded once."""
    if spec.startswith(GRPC_SCHEME):
        host, sep, port = spec.removeprefix(GRPC_SCHEME).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EvalError(f"config field '{field}': {spec!r} is not grpc://host:port")
        key = spec
    else:
        if not (Path(spec) / "config.json").is_file():
            raise EvalError(
                f"config field '{field}': {spec} is neither a model folder (with config.json) "
                "nor grpc://host:port"
            )
        key = str(Path(spec).resolve())
    if key not in opened:
        try:
            opened[key] = (
                ServicePolicy(spec)
                if spec.startswith(GRPC_SCHEME)
                else FolderPolicy(spec, config.device, config.dtype)
            )
        except PolicyError as err:
            raise EvalError(f"config field '{field}': {err}") from err
    return opened[key]


def open_reference(
    config: EvalConfig, candidate: Policy, baseline: Policy, opened: dict[str, Policy]
) -> FolderPolicy | None:
    """The folder the candidate's KL is measured against, or None for no KL. The default (the
    baseline) gives no KL when either side is served over gRPC or the tokenizers differ; a
    reference given explicitly that cannot serve is an error."""
    if config.reference is None:
        if not (isinstance(baseline, FolderPolicy) and isinstance(candidate, FolderPolicy)):
            return None
        same = baseline is candidate or same_vocabulary(baseline, candidate)
        return baseline if same else None
    if config.reference.startswith(GRPC_SCHEME):
        raise EvalError("config field 'reference': the KL needs a model folder, not grpc://")
    if not isinstance(candidate, FolderPolicy):
        raise EvalError(
            "config field 'reference': the KL needs the candidate's full next-token "
            "distributions, so the candidate must be a model folder"
        )
    reference = open_policy("reference", config.reference, config, opened)
    if not (reference is candidate or same_vocabulary(reference, candidate)):
        raise EvalError(
            f"config field 'reference': {config.reference} and the candidate have different "
            "tokenizers; the KL needs one vocabulary"
        )
    return reference


def same_vocabulary(a: FolderPolicy, b: FolderPolicy) -> bool:
    return a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------
# The stage


def config_as_json(config: EvalConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def write_summary(output: Path, summary: dict) -> Path:
    """eval.json through a temporary sibling and a rename: a reader sees all of it or none."""
    output.mkdir(parents=True, exist_ok=True)
    target = output / EVAL_FILE
    staging = output / f".{EVAL_FILE}.tmp-{os.getpid()}"
    staging.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(staging, target)
    return target


def run_eval(config: EvalConfig) -> dict:
    started = time.time()

    # 1. Check the input before any model loads.
    config.validate()
    prompts = load_prompts(config.data, config.num_prompts)
    conversations = [p.messages for p in prompts]
    try:
        annotator = load_annotator(config.annotator)
    except AnnotatorError as err:
        raise EvalError(f"config field 'annotator': {err}") from err
    try:
        judge = ServiceJudge(config.judge) if config.judge else None
    except JudgeError as err:
        raise EvalError(f"config field 'judge': {err}") from err
    opened: dict[str, Policy] = {}
    candidate = open_policy("candidate", config.candidate, config, opened)
    baseline = open_policy("baseline", config.baseline, config, opened)
    reference = open_reference(config, candidate, baseline, opened)
    for field, policy in [("candidate", candidate), ("baseline", baseline)]:
        if isinstance(policy, FolderPolicy):
            try:
                policy.check(conversations)
            except PolicyError as err:
                raise EvalError(f"config field '{field}' on {config.data}: {err}") from err
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p, config.seed)

    # 2-4. The answers, and the KL on the candidate's while the candidate is loaded.
    cache = AnswersCache(config, sha256_file(config.data), sampling)
    candidate_answers = cache.answers("candidate", candidate, conversations)
    kl = None
    if reference is not None:
        kl = cache.kl(candidate, reference)
        if kl is None:
            try:
                kls = kl_to_reference(
                    candidate, reference, conversations, candidate_answers, config.batch_size
                )
            except PolicyError as err:  # the two heads differ in size
                raise EvalError(f"config field 'reference': {err}") from err
            kl = statistics.fmean(kls)
            cache.keep_kl(candidate, reference, kl)
    baseline_answers = cache.answers("baseline", baseline, conversations)

    # 5. Scores and pairwise verdicts, on the question as the user asked it.
    questions = [p.question for p in prompts]
    candidate_texts = [a.text for a in candidate_answers]
    baseline_texts = [a.text for a in baseline_answers]
    try:
        candidate_scores = [annotator.score(q, a) for q, a in zip(questions, candidate_texts)]
        baseline_scores = [annotator.score(q, a) for q, a in zip(questions, baseline_texts)]
    except (TypeError, ValueError) as err:  # AnnotatorError
        raise EvalError(f"config field 'annotator': {err}") from err
    judged, prefer = None, annotator.prefer
    if judge is not None:
        try:
            verdicts = judge.judge(questions, candidate_texts, baseline_texts)
        except JudgeError as err:
            raise EvalError(f"config field 'judge': {err}") from err
        finally:
            judge.close()
        judged, prefer = judge.summary(verdicts), judge.prefer_fn(verdicts, candidate_texts)
    try:
        comparison, records = compare(
            questions, candidate_texts, baseline_texts, prefer, random.Random(config.seed)
        )
    except (TypeError, ValueError) as err:  # a verdict not in [0, 1]
        field = "judge" if judge is not None else "annotator"
        raise EvalError(f"config field '{field}': {err}") from err
    metrics = {
        "win_rate": comparison.win_rate,
        "win_rate_ci_low": comparison.ci_low,
        "win_rate_ci_high": comparison.ci_high,
        "wins": comparison.wins,
        "losses": comparison.losses,
        "ties": comparison.ties,
        "n": comparison.n,
        "candidate_score_mean": statistics.fmean(candidate_scores),
        "baseline_score_mean": statistics.fmean(baseline_scores),
        "candidate_length_mean": mean_tokens(candidate_answers),
        "baseline_length_mean": mean_tokens(baseline_answers),
        "candidate_words_mean": mean_words(candidate_answers),
        "baseline_words_mean": mean_words(baseline_answers),
        "kl_to_reference": kl,
    }
    examples = [
        {**record, "candidate_score": candidate_scores[i], "baseline_score": baseline_scores[i]}
        for i, record in enumerate(records[: config.examples])
    ]

    # 6. The summary.
    import transformers

    summary = {
        "stage": "eval",
        "policies": {
            "candidate": candidate.describe(),
            "baseline": baseline.describe(),
            "reference": None if reference is None else reference.describe(),
        },
        "annotator": annotator.name,
        "judge": judged,
        "data": {
            "path": str(config.data),
            "sha256": sha256_file(config.data),
            "prompts": len(prompts),
        },
        "metrics": metrics,
        "examples": examples,
        "config": config_as_json(config),
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_summary(Path(config.output), summary)
    return summary


def fingerprint(policy: Policy) -> dict[str, Any]:
    """What identifies a policy's answers: a folder's files (name, size, mtime: a retrained or
    reassembled folder gets new ones) and dtype; a service's address, model and weights version."""
    described = policy.describe()
    if isinstance(policy, FolderPolicy):
        files = sorted(p for p in policy.folder.iterdir() if p.is_file())
        described["files"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return described


class AnswersCache:
    """`answers_cache`: a policy's answers and the candidate's KL, one JSON file per key, written
    atomically; with no folder configured, it generates every time and keeps nothing."""

    def __init__(self, config: EvalConfig, data_sha256: str, sampling: Sampling):
        self.config, self.sampling = config, sampling
        self.root = None if config.answers_cache is None else Path(config.answers_cache)
        self.inputs = {
            "data_sha256": data_sha256,
            "num_prompts": config.num_prompts,
            "sampling": asdict(sampling),
            "batch_size": config.batch_size,  # batches set the folder form's seeds
        }

    def _path(self, kind: str, **parts: Any) -> Path | None:
        if self.root is None:
            return None
        text = json.dumps({"kind": kind, **self.inputs, **parts}, sort_keys=True, default=str)
        return self.root / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def _read(self, path: Path | None) -> Any:
        if path is None or not path.exists():
            return None
        return json.loads(path.read_text())["value"]

    def _write(self, path: Path | None, value: Any) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"value": value}))
        os.replace(tmp, path)

    def answers(self, field: str, policy: Policy, conversations: list) -> list[Answer]:
        path = self._path("answers", policy=fingerprint(policy))
        kept = self._read(path)
        if kept is not None:
            return [Answer(a["text"], list(a["token_ids"])) for a in kept]
        answers = answers_of(field, policy, conversations, self.sampling, self.config)
        self._write(path, [asdict(a) for a in answers])
        return answers

    def _kl_path(self, candidate: Policy, reference: Policy) -> Path | None:
        return self._path("kl", policy=fingerprint(candidate), reference=fingerprint(reference))

    def kl(self, candidate: Policy, reference: Policy) -> float | None:
        return self._read(self._kl_path(candidate, reference))

    def keep_kl(self, candidate: Policy, reference: Policy, kl: float) -> None:
        self._write(self._kl_path(candidate, reference), kl)


def answers_of(
    field: str, policy: Policy, conversations: list, sampling: Sampling, config: EvalConfig
) -> list[Answer]:
    try:
        return generate_all(policy, conversations, sampling, config.batch_size)
    except PolicyError as err:  # the service refused a request as invalid
        raise EvalError(f"config field '{field}' on {config.data}: {err}") from err


def mean_tokens(answers: list[Answer]) -> float:
    return statistics.fmean(len(a.token_ids) for a in answers)


def mean_words(answers: list[Answer]) -> float:
    return statistics.fmean(len(words(a.text)) for a in answers)
