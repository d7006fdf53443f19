"""Human attention where the judge is unsure: with `annotation_max_confidence` set, a publishing
Compare also offers the pairs the judge is least sure of on the real broker's
rlhf.annotation-queue.v1 (reason "judge", disagreement 1 - confidence), and only those."""

from __future__ import annotations

import uuid

from services.common import topics
from services.genproto.rlhf.v1 import common_pb2, events_pb2, judge_pb2
from tests.integration.gateway.gateway_process import read_topic
from tests.integration.judge.judge_stack import judge_stack

RULE = "tests.integration.judge.rules:longer"  # equal lengths: a tie, confidence 0


def test_the_pairs_the_judge_is_unsure_of_go_to_the_queue(kafka_settings):
    from services.common.kafka import ensure_topics

    ensure_topics(kafka_settings, [t for t in topics.TOPICS if t.name == topics.ANNOTATION_QUEUE])
    tag = uuid.uuid4().hex[:6]
    pairs = [
        judge_pb2.JudgedPair(
            prompt=common_pb2.Prompt(text=f"q1 {tag}"), answer_a="same", answer_b="sane",
            response_id_a="r1", response_id_b="r2",
        ),  # a tie: confidence 0, offered
        judge_pb2.JudgedPair(
            prompt=common_pb2.Prompt(text=f"q2 {tag}"), answer_a="long answer", answer_b="no"
        ),  # sure: published as a label, not offered
    ]  # fmt: skip
    with judge_stack(
        None, annotator=RULE, kafka=kafka_settings, annotation_max_confidence=0.2
    ) as judge:
        reply = judge.stub().Compare(
            judge_pb2.CompareRequest(pairs=pairs, publish=True), timeout=60
        )
        assert [v.confidence for v in reply.verdicts] == [0.0, 1.0]
        assert judge.metric("rlhf_judge_annotation_candidates_total") == 1.0
    found = read_topic(
        kafka_settings,
        topics.ANNOTATION_QUEUE,
        events_pb2.AnnotationCandidate,
        done=lambda found: any(tag in c.prompt_text for c in found),
        timeout_s=60,
    )
    (candidate,) = [c for c in found if tag in c.prompt_text]
    assert candidate.reason == "judge" and candidate.disagreement == 1.0
    assert list(candidate.responses) == ["same", "sane"]
    assert list(candidate.response_ids) == ["r1", "r2"]
    assert reply.published == 1  # the sure one is a label; the tie is not
