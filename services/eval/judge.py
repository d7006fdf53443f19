"""A pairwise AI judge for `rlhf eval`: a running rlhf.v1.JudgeService (services/judge) instead
of the annotator's score comparison.

    judge = ServiceJudge("grpc://localhost:50054")   # or "localhost:50054"
    verdicts = judge.judge(questions, candidate_answers, baseline_answers)   # one per prompt
    prefer = judge.prefer_fn(verdicts)          # what stats.compare calls, in prompt order

The service asks each pair in both orders and combines them (it cancels its own position bias),
so the random order of `stats.compare` changes nothing here: the verdict is the service's
P(candidate better), seen from whichever side compare shows first.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import grpc

from services.common.channels import client_channel
from services.genproto.rlhf.v1 import common_pb2, judge_pb2, judge_pb2_grpc

GRPC_SCHEME = "grpc://"
BATCH = 8
"""Pairs per Compare request (each is two forward passes of the judge's model)."""
EMPTY = "(no answer)"
"""What the judge is shown for an empty answer (it refuses empty text)."""


class JudgeError(ValueError):
    """The judge named cannot be used (bad address, unreachable, wrong number of verdicts)."""


@dataclass(frozen=True)
class JudgeVerdict:
    p_candidate: float
    """P(candidate better), both orders combined."""
    confidence: float
    position_bias: float
    """P(first shown better) averaged over the two orders, minus 0.5 (0: no position bias)."""


class ServiceJudge:
    def __init__(self, spec: str, timeout_s: float = 900.0):
        self.address = spec.removeprefix(GRPC_SCHEME)
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise JudgeError(f"judge {spec!r}: expected [grpc://]host:port of a JudgeService")
        self.timeout_s = timeout_s
        self.channel = client_channel(self.address)
        self.stub = judge_pb2_grpc.JudgeServiceStub(self.channel)
        try:
            info = self.stub.GetJudgeInfo(judge_pb2.GetJudgeInfoRequest(), timeout=30)
        except grpc.RpcError as err:
            raise JudgeError(f"judge {spec!r}: {err.code().name}: {err.details()}") from None
        self.judge_model, self.rubric_version, self.mode = (
            info.judge_model,
            info.rubric_version,
            info.mode,
        )

    def judge(
        self, questions: list[str], candidates: list[str], baselines: list[str]
    ) -> list[JudgeVerdict]:
        verdicts: list[JudgeVerdict] = []
        for start in range(0, len(questions), BATCH):
            span = slice(start, start + BATCH)
            pairs = [
                judge_pb2.JudgedPair(
                    prompt=common_pb2.Prompt(text=q), answer_a=c or EMPTY, answer_b=b or EMPTY
                )
                for q, c, b in zip(questions[span], candidates[span], baselines[span])
            ]
            try:
                reply = self.stub.Compare(
                    judge_pb2.CompareRequest(pairs=pairs), timeout=self.timeout_s
                )
            except grpc.RpcError as err:
                raise JudgeError(f"judge: {err.code().name}: {err.details()}") from None
            if len(reply.verdicts) != len(pairs):
                raise JudgeError(f"judge gave {len(reply.verdicts)} verdicts for {len(pairs)}")
            verdicts += [
                JudgeVerdict(v.p_a_better, v.confidence, (v.p_a_first + v.p_b_first) / 2 - 0.5)
                for v in reply.verdicts
            ]
        return verdicts

    @staticmethod
    def prefer_fn(verdicts: list[JudgeVerdict], candidates: list[str]):
        """A `prefer(prompt, first, second)` for stats.compare, which asks once per prompt, in
        order: P(first better), from that prompt's verdict on (candidate, baseline). compare()
        passes the candidate's own string object first or second, so identity tells which."""
        turn = iter(range(len(verdicts)))

        def prefer(_prompt: str, first: str, _second: str) -> float:
            i = next(turn)
            p = verdicts[i].p_candidate
            return p if first is candidates[i] else 1.0 - p

        return prefer

    def summary(self, verdicts: list[JudgeVerdict]) -> dict:
        return {
            "address": self.address,
            "judge_model": self.judge_model,
            "rubric_version": self.rubric_version,
            "mode": self.mode,
            "p_candidate_mean": statistics.fmean(v.p_candidate for v in verdicts),
            "confidence_mean": statistics.fmean(v.confidence for v in verdicts),
            "position_bias_mean": statistics.fmean(v.position_bias for v in verdicts),
        }

    def close(self) -> None:
        self.channel.close()
