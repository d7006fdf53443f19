"""AI labels into the data path: a judge's verdict as a `PreferenceRecord` (source AI) on
`rlhf.preferences.v1`, where the reward trainer takes it like any other pair.

1. `ai_record`: chosen = the answer the judge prefers, rejected = the other; `ai` holds the
   judge model, the rubric version, P(chosen better) (so >= 0.5) and the confidence. A tie, or a
   verdict not surer than `min_confidence`, gives no record.
2. The record id is derived from the judge, the rubric version, the prompt and both answers, so
   a retried request publishes the same id and the reward trainer stores it once.
3. `publish`: sends every record keyed by its prompt hash and waits for the broker's acks
   (acks=all, idempotent producer) before the caller answers.
"""

from __future__ import annotations

import threading

from kafka import KafkaProducer

from services.common import topics
from services.common.preferences import Source, derived_id, pair_record, prompt_hash
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import common_pb2, events_pb2
from services.judge.judges import Pair, Verdict

SEND_TIMEOUT_S = 30.0


def ai_record(
    conversation: common_pb2.Prompt | None,
    pair: Pair,
    verdict: Verdict,
    judge_model: str,
    rubric_version: str,
    derived_from: list[str] | None = None,
    min_confidence: float = 0.0,
) -> events_pb2.PreferenceRecord | None:
    """The record of one verdict, or None for a tie (or one not surer than min_confidence)."""
    if verdict.p_a_better == 0.5 or verdict.confidence <= min_confidence:
        return None
    a_wins = verdict.p_a_better > 0.5
    chosen, rejected = (pair.answer_a, pair.answer_b) if a_wins else (pair.answer_b, pair.answer_a)
    p_chosen = verdict.p_a_better if a_wins else 1.0 - verdict.p_a_better
    record = pair_record(
        pair.question,
        chosen,
        rejected,
        Source.PREFERENCE_SOURCE_AI,
        [i for i in (derived_from or []) if i],
        derived_id("ai", judge_model, rubric_version, pair.question, chosen, rejected),
        conversation,
    )
    record.ai.CopyFrom(
        events_pb2.AiLabel(
            judge_model=judge_model,
            rubric_version=rubric_version,
            p_chosen_better=p_chosen,
            confidence=verdict.confidence,
        )
    )
    return record


def unsure_candidate(
    conversation: common_pb2.Prompt | None,
    pair: Pair,
    verdict: Verdict,
    response_ids: list[str],
    max_confidence: float,
) -> events_pb2.AnnotationCandidate | None:
    """The pair as an annotation candidate when the judge is at most `max_confidence` sure of
    it (None otherwise, or when that setting is off). Its `disagreement` is 1 - confidence:
    the queue sorts judge and ensemble candidates on one scale, most unsure first."""
    if max_confidence < 0 or verdict.confidence > max_confidence:
        return None
    from google.protobuf.timestamp_pb2 import Timestamp

    now = Timestamp()
    now.GetCurrentTime()
    return events_pb2.AnnotationCandidate(
        candidate_id=derived_id("judge-unsure", pair.question, pair.answer_a, pair.answer_b),
        prompt=conversation if conversation is not None else common_pb2.Prompt(text=pair.question),
        prompt_text=pair.question,
        responses=[pair.answer_a, pair.answer_b],
        response_ids=list(response_ids) if all(response_ids) else [],
        disagreement=1.0 - verdict.confidence,
        reason="judge",
        created_at=now,
    )


class LabelPublisher:
    """A producer opened at the first publish (a judge that never publishes needs no Kafka)."""

    def __init__(self, settings: KafkaSettings):
        self.settings = settings
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                from services.common.kafka import make_producer

                self._producer = make_producer(self.settings)
            return self._producer

    def publish(self, records: list[events_pb2.PreferenceRecord]) -> int:
        """Sends and waits for every ack; raises the first delivery error."""
        if not records:
            return 0
        producer = self.producer()
        sent = [
            producer.send(topics.PREFERENCES, key=prompt_hash(r.prompt), value=r) for r in records
        ]
        for future in sent:
            future.get(timeout=SEND_TIMEOUT_S)
        return len(sent)

    def offer(self, candidates: list[events_pb2.AnnotationCandidate]) -> int:
        """Sends annotation candidates to the queue topic and waits for every ack."""
        if not candidates:
            return 0
        producer = self.producer()
        sent = [
            producer.send(topics.ANNOTATION_QUEUE, key=c.candidate_id, value=c) for c in candidates
        ]
        for future in sent:
            future.get(timeout=SEND_TIMEOUT_S)
        return len(sent)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=10)
                self._producer = None
