"""gRPC JudgeService: checks and converts messages, calls the judge, publishes, records metrics.

Bad input is INVALID_ARGUMENT naming the field (`pairs[1].answer_b: empty answer`). A publish
that the broker does not acknowledge fails the call (UNAVAILABLE): a caller that got an OK knows
its labels are in Kafka.
"""

from __future__ import annotations

import logging

import grpc
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import BATCH_BUCKETS
from services.common.prompts import checked_prompt_text
from services.common.rpc import FieldError, abort_for, remaining_s
from services.genproto.rlhf.v1 import judge_pb2, judge_pb2_grpc
from services.judge.judges import Judge, Pair, compare
from services.judge.labels import LabelPublisher, ai_record, unsure_candidate
from services.judge.settings import JudgeSettings

log = logging.getLogger(__name__)


class JudgeMetrics:
    """rlhf_judge_*: pairs per request, verdicts by winner, labels published."""

    def __init__(self, registry: CollectorRegistry):
        self.request_pairs = Histogram(
            "rlhf_judge_request_pairs",
            "Pairs per Compare request.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.verdicts = Counter(
            "rlhf_judge_verdicts_total",
            "Verdicts given, by the answer preferred (a, b or tie).",
            ["winner"],
            registry=registry,
        )
        self.offered = Counter(
            "rlhf_judge_annotation_candidates_total",
            "Pairs the judge was unsure of, offered to people on the annotation queue.",
            registry=registry,
        )
        self.published = Counter(
            "rlhf_judge_labels_published_total",
            "AI preference records acknowledged by Kafka.",
            registry=registry,
        )


def checked_pairs(request: judge_pb2.CompareRequest, settings: JudgeSettings) -> list[Pair]:
    """The pairs of a valid request; FieldError names the first bad field."""
    if not request.pairs:
        raise FieldError("pairs", "empty batch: send at least one (prompt, answer_a, answer_b)")
    if len(request.pairs) > settings.max_pairs:
        raise FieldError(
            "pairs", f"{len(request.pairs)} pairs exceed the limit of {settings.max_pairs}"
        )
    pairs = []
    for i, pair in enumerate(request.pairs):
        where = f"pairs[{i}]"
        question = checked_prompt_text(pair.prompt, where)
        texts = {"prompt": question, "answer_a": pair.answer_a, "answer_b": pair.answer_b}
        for name, text in texts.items():
            if not text.strip():
                raise FieldError(f"{where}.{name}", f"empty {name.split('_')[0]}")
            if len(text) > settings.max_text_chars:
                raise FieldError(
                    f"{where}.{name}",
                    f"{len(text)} characters exceed the limit of {settings.max_text_chars}",
                )
        pairs.append(Pair(question, pair.answer_a, pair.answer_b))
    return pairs


class JudgeServicer(judge_pb2_grpc.JudgeServiceServicer):
    def __init__(
        self,
        settings: JudgeSettings,
        judge: Judge,
        publisher: LabelPublisher,
        metrics: JudgeMetrics,
    ):
        self.settings = settings
        self.judge = judge
        self.publisher = publisher
        self.metrics = metrics

    def Compare(
        self, request: judge_pb2.CompareRequest, context: grpc.ServicerContext
    ) -> judge_pb2.CompareResponse:
        judge, rubric = self.judge, self.judge.rubric
        try:
            pairs = checked_pairs(request, self.settings)
            self.metrics.request_pairs.observe(len(pairs))
            verdicts = compare(judge, pairs, remaining_s(context, self.settings.triton.timeout_s))
        except grpc.RpcError as error:  # from the PolicyService a policy-mode judge asks
            context.abort(error.code(), f"judge's policy service: {error.details()}")
        except Exception as error:  # noqa: BLE001 - abort_for re-raises what it does not map
            abort_for(context, error, "judge")
        ids = [""] * len(pairs)
        if request.publish or self.settings.publish:
            unsure = [
                c
                for wire, pair, verdict in zip(request.pairs, pairs, verdicts)
                if (
                    c := unsure_candidate(
                        wire.prompt if wire.HasField("prompt") else None,
                        pair,
                        verdict,
                        [wire.response_id_a, wire.response_id_b],
                        self.settings.annotation_max_confidence,
                    )
                )
                is not None
            ]
            records = {}
            for i, (wire, pair, verdict) in enumerate(zip(request.pairs, pairs, verdicts)):
                record = ai_record(
                    wire.prompt,
                    pair,
                    verdict,
                    judge.name,
                    rubric.version,
                    [wire.response_id_a, wire.response_id_b],
                    self.settings.publish_min_confidence,
                )
                if record is not None:
                    records[i] = record
            try:
                self.publisher.publish(list(records.values()))
                self.metrics.offered.inc(self.publisher.offer(unsure))
            except KafkaError as error:
                log.error("publishing AI labels failed", extra={"fields": {"error": repr(error)}})
                context.abort(grpc.StatusCode.UNAVAILABLE, f"publishing the labels failed: {error}")
            self.metrics.published.inc(len(records))
            for i, record in records.items():
                ids[i] = record.preference_id
        for verdict in verdicts:
            winner = "a" if verdict.p_a_better > 0.5 else "b" if verdict.p_a_better < 0.5 else "tie"
            self.metrics.verdicts.labels(winner).inc()
        return judge_pb2.CompareResponse(
            verdicts=[
                judge_pb2.Verdict(
                    p_a_better=v.p_a_better,
                    confidence=v.confidence,
                    p_a_first=v.p_a_first,
                    p_b_first=v.p_b_first,
                    preference_id=pid,
                )
                for v, pid in zip(verdicts, ids)
            ],
            judge_model=judge.name,
            rubric_version=rubric.version,
            published=sum(1 for pid in ids if pid),
        )

    def GetJudgeInfo(
        self, request: judge_pb2.GetJudgeInfoRequest, context: grpc.ServicerContext
    ) -> judge_pb2.GetJudgeInfoResponse:
        return judge_pb2.GetJudgeInfoResponse(
            judge_model=self.judge.name,
            rubric_version=self.judge.rubric.version,
            mode=self.judge.mode,
            rubric=self.judge.rubric.text,
        )
