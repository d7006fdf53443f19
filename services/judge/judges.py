"""The judge's logic, free of gRPC: each pair asked in both orders, the two answers combined.

Three judges answer the same question, "P(the first-shown answer is better)", for a batch of
(question, first, second) rows:
- `ModelJudge`: an instruct model inside Triton (services.judge.triton_model) reads the rubric,
  the question and both answers, and the probability is its next-token probability of "A"
  normalised over the two letters: exp(lp_A) / (exp(lp_A) + exp(lp_B));
- `PolicyJudge`: the same question put to a running PolicyService (whose model is in Triton):
  one generated token with `top_logprobs` and a logit bias of +100 on both letters, so both
  are among the alternatives returned; the bias adds the same constant to both logits, so it
  cancels in the two-letter ratio;
- `RuleJudge`: a `module:function` score (services/common/annotator.py), 1, 0 or 0.5 from the
  two answers' scores, so tests and demos label deterministically.

    judge = make_judge(settings)          # ModelJudge, PolicyJudge or RuleJudge by the settings
    verdicts = compare(judge, [Pair("2+2?", "4", "5")], timeout_s=30)
    verdicts[0].p_a_better, verdicts[0].confidence

`compare` asks every pair as (A, B) and as (B, A) in one batch and combines them with
services.judge.rubric.combine, which cancels a judge's preference for a position.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tritonclient.grpc as grpcclient

from services.common.annotator import Annotator, load_annotator
from services.common.channels import client_channel
from services.common.models import load_tokenizer
from services.common.triton_client import connect, make_inputs
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.judge.rubric import (
    LETTERS,
    Rubric,
    combine,
    confidence,
    judge_messages,
    load_rubric,
)
from services.judge.settings import JudgeSettings


@dataclass(frozen=True)
class Pair:
    question: str
    """The prompt as the judge reads it (services.common.prompts renders a conversation)."""
    answer_a: str
    answer_b: str


@dataclass(frozen=True)
class Verdict:
    p_a_better: float
    """Both orders combined: (p_a_first + 1 - p_b_first) / 2."""
    confidence: float
    """|2 p_a_better - 1|."""
    p_a_first: float
    """P(first-shown better) with A shown first."""
    p_b_first: float
    """P(first-shown better) with B shown first."""


class Judge(Protocol):
    name: str
    """The judge model in verdicts and AI labels."""
    mode: str
    """`model` or `rules`."""
    rubric: Rubric

    def first_better(
        self, questions: list[str], firsts: list[str], seconds: list[str], timeout_s: float
    ) -> np.ndarray:
        """(N,) float64: P(the first-shown answer is better), one per row."""
        ...

    def close(self) -> None: ...


def compare(judge: Judge, pairs: list[Pair], timeout_s: float) -> list[Verdict]:
    """One verdict per pair: rows 0..n-1 show A first, rows n..2n-1 show B first."""
    n = len(pairs)
    questions = [p.question for p in pairs] * 2
    firsts = [p.answer_a for p in pairs] + [p.answer_b for p in pairs]
    seconds = [p.answer_b for p in pairs] + [p.answer_a for p in pairs]
    first = judge.first_better(questions, firsts, seconds, timeout_s)  # (2n,)
    verdicts = []
    for p_a_first, p_b_first in zip(first[:n], first[n:]):
        p = combine(float(p_a_first), float(p_b_first))
        verdicts.append(Verdict(p, confidence(p), float(p_a_first), float(p_b_first)))
    return verdicts


def two_letter_probability(logprob_a: np.ndarray, logprob_b: np.ndarray) -> np.ndarray:
    """P("A") normalised over the two letters, exp(a) / (exp(a) + exp(b)) = sigmoid(a - b),
    computed in float64 (the letters' full-softmax probabilities can both be tiny)."""
    diff = np.asarray(logprob_a, np.float64) - np.asarray(logprob_b, np.float64)
    return 1.0 / (1.0 + np.exp(-diff))


def letter_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "A" and "B"; ValueError when the tokenizer splits either letter."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer splits {letter!r} into {len(encoded)} tokens")
        ids.append(encoded[0])
    return ids[0], ids[1]


class ModelJudge:
    """Client of the Triton `judge` model; big batches go as concurrent chunks."""

    mode = "model"

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.name = settings.judge_model
        self.rubric = load_rubric(settings.rubric_file)
        self.client = connect(settings.triton)

    def _chunk(self, messages: list[str], timeout_s: float) -> Future:
        future: Future = Future()
        self.client.async_infer(
            self.settings.triton_model,
            make_inputs({"MESSAGES": np.array(messages, dtype=np.object_).reshape(-1, 1)}),
            callback=lambda result, error: (
                future.set_exception(error) if error else future.set_result(result)
            ),
            outputs=[grpcclient.InferRequestedOutput(o) for o in ("LOGPROB_A", "LOGPROB_B")],
            client_timeout=timeout_s,
        )
        return future

    def first_better(
        self, questions: list[str], firsts: list[str], seconds: list[str], timeout_s: float
    ) -> np.ndarray:
        messages = [
            json.dumps(judge_messages(self.rubric, q, f, s))
            for q, f, s in zip(questions, firsts, seconds)
        ]
        size = self.settings.triton_max_batch_size
        futures = [
            self._chunk(messages[i : i + size], timeout_s) for i in range(0, len(messages), size)
        ]
        results = [f.result() for f in futures]
        logprob_a = np.concatenate([r.as_numpy("LOGPROB_A")[:, 0] for r in results])
        logprob_b = np.concatenate([r.as_numpy("LOGPROB_B")[:, 0] for r in results])
        return two_letter_probability(logprob_a, logprob_b)

    def close(self) -> None:
        self.client.close()


LETTER_BIAS = 100.0
"""The policy's logit-bias bound: both letters become the two most likely tokens."""


class PolicyJudge:
    """The judge through a running PolicyService (one Generate per batch of judge prompts)."""

    mode = "policy"

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.rubric = load_rubric(settings.rubric_file)
        # The tokenizer of the policy's model folder (no weights): the letters' token ids.
        self.letters = letter_token_ids(load_tokenizer(settings.model_dir))
        # TLS when this process's client TLS settings say so, like every other gRPC client.
        self.channel = client_channel(
            settings.policy_address.removeprefix("grpc://"),
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        # wait_for_ready: a judge started beside its policy waits for it to listen instead of
        # failing its start (and, on Kubernetes, restarting until the policy is up).
        self.name = (
            settings.judge_name
            or self.stub.GetModelInfo(
                policy_pb2.GetModelInfoRequest(),
                timeout=settings.triton.timeout_s,
                wait_for_ready=True,
            ).model
        )

    def first_better(
        self, questions: list[str], firsts: list[str], seconds: list[str], timeout_s: float
    ) -> np.ndarray:
        a, b = self.letters
        prompts = [
            common_pb2.Prompt(
                messages=common_pb2.ChatMessages(
                    messages=[
                        common_pb2.ChatMessage(role=m["role"], content=m["content"])
                        for m in judge_messages(self.rubric, q, f, s)
                    ]
                )
            )
            for q, f, s in zip(questions, firsts, seconds)
        ]
        sampling = policy_pb2.SamplingParams(
            n=1,
            max_new_tokens=1,
            temperature=0.0,
            top_logprobs=2,
            logit_bias={a: LETTER_BIAS, b: LETTER_BIAS},
        )
        size = self.settings.triton_max_batch_size
        logprob_a, logprob_b = [], []
        for start in range(0, len(prompts), size):
            response = self.stub.Generate(
                policy_pb2.GenerateRequest(
                    prompts=prompts[start : start + size], sampling=sampling
                ),
                timeout=timeout_s,
            )
            for completion in response.completions:
                top = {t.token_id: t.logprob for t in completion.samples[0].token_logprobs[0].top}
                if a not in top or b not in top:
                    raise RuntimeError(f"the policy did not return both letters: {sorted(top)}")
                logprob_a.append(top[a])
                logprob_b.append(top[b])
        return two_letter_probability(np.array(logprob_a), np.array(logprob_b))

    def close(self) -> None:
        self.channel.close()


RULES_VERSION = "rules"
"""The rubric version of a rule-based judge's labels: its module:function is its judge_model."""


class RuleJudge:
    """The rule-based judge: a score function's pairwise verdict (1, 0 or 0.5)."""

    mode = "rules"

    def __init__(self, settings: JudgeSettings, annotator: Annotator | None = None):
        self.annotator = annotator or load_annotator(settings.annotator)
        self.name = self.annotator.name
        # No rubric is read: the score function is the whole judgement, and labels say so.
        self.rubric = Rubric(RULES_VERSION, f"the score function {self.name}")

    def first_better(
        self, questions: list[str], firsts: list[str], seconds: list[str], timeout_s: float
    ) -> np.ndarray:
        return np.array(
            [self.annotator.prefer(q, f, s) for q, f, s in zip(questions, firsts, seconds)],
            dtype=np.float64,
        )

    def close(self) -> None:
        pass


JUDGES: dict[str, type] = {"model": ModelJudge, "policy": PolicyJudge, "rules": RuleJudge}


def make_judge(settings: JudgeSettings) -> Judge:
    """The judge of the settings' mode (services.judge.settings.JudgeSettings.mode)."""
    return JUDGES[settings.mode](settings)
