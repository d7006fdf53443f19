"""The rollout worker's Kafka side on the real broker, without models: a record of a tailed topic
that does not decode is dead-lettered (with its origin, counted) and the tail goes on to use the
next record; annotation candidates reach rlhf.annotation-queue.v1, keyed by candidate id, after
the rollouts they name."""

from __future__ import annotations

import time
import uuid

from services.common import topics
from services.common.kafka import decode, ensure_topics, make_consumer, make_producer
from services.genproto.rlhf.v1 import common_pb2, events_pb2, policy_pb2, reward_pb2
from services.rollout.candidates import annotation_candidates
from services.rollout.settings import RolloutSettings
from services.rollout.worker import RolloutWorker, build_rollouts
from tests.integration.test_dead_letters import POISON, dead_letters, headers_of
from tests.integration.trainer.helpers import private_topic

UNREACHABLE = "127.0.0.1:9"  # gRPC channels connect lazily: these tests never call a model


def _worker(kafka_settings, tmp_path, **settings) -> RolloutWorker:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Say hi."}\n')
    return RolloutWorker(
        RolloutSettings(
            dataset=dataset,
            policy_address=UNREACHABLE,
            reward_address=UNREACHABLE,
            reference_address=UNREACHABLE,
            kafka=kafka_settings,
            **settings,
        )
    )


def _topic(kafka_settings, prefix: str) -> str:
    name = f"test.{prefix}.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_settings, [topics.TopicSpec(name, 1)])
    return name


def _wait(condition, what: str, timeout_s: float = 60.0, between=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        if between is not None:
            between()
        time.sleep(0.5)


def _read(kafka_settings, topic: str, count: int, timeout_s: float = 60.0) -> list:
    consumer = make_consumer(kafka_settings, None, [topic], auto_offset_reset="earliest")
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            records += [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
    finally:
        consumer.close()
    return records


def test_unreadable_weights_and_generation_records_are_dead_lettered_and_the_tails_go_on(
    kafka_settings, tmp_path
):
    weights, generations = _topic(kafka_settings, "weights"), _topic(kafka_settings, "generations")
    producer = make_producer(kafka_settings)
    poison = producer.send(weights, key="policy", value=POISON).get(30)
    event = events_pb2.WeightsVersionEvent(model="policy", weights_version=7)
    producer.send(weights, key="policy", value=event).get(30)
    worker = _worker(
        kafka_settings,
        tmp_path,
        rollouts_topic=private_topic(kafka_settings),
        weights_topic=weights,
        generations_topic=generations,
        live_prompt_fraction=0.5,
    )
    count = worker.registry.get_sample_value
    try:
        # The weights tail reads from the beginning: the poison, then the event after it.
        _wait(lambda: worker.trainer_version == 7, "the weights event after the poison was lost")
        labels = {"topic": weights, "consumer": "rollout-worker"}
        _wait(lambda: count("rlhf_dlq_records_total", labels) == 1, "the poison was not counted")
        # The generations tail starts at the end: send poison until it has seen one, then a
        # real generation, which it uses.
        labels = {"topic": generations, "consumer": "rollout-worker"}
        _wait(
            lambda: count("rlhf_dlq_records_total", labels),
            "a poison generation record was never dead-lettered",
            between=lambda: producer.send(generations, key="g", value=POISON).get(30),
        )
        record = events_pb2.GenerationRecord(
            response_id="live-1", prompt=common_pb2.Prompt(text="live question")
        )
        producer.send(generations, key="live-1", value=record).get(30)
        _wait(
            lambda: any(p.text == "live question" for p in worker.live),
            "the generation after the poison was lost",
        )
        assert all(tail._thread.is_alive() for tail in worker.tails)
    finally:
        worker.close()
        producer.close()
    (letter,) = dead_letters(kafka_settings, weights, 1)
    h = headers_of(letter)
    assert letter.value == POISON and letter.key == b"policy"
    assert (h["dlq.source.topic"], h["dlq.source.offset"]) == (weights, str(poison.offset))
    assert h["dlq.consumer"] == "rollout-worker" and h["dlq.error"].startswith("DecodeError")
    letters = dead_letters(kafka_settings, generations, 1)
    assert letters and all(r.value == POISON for r in letters)


def test_annotation_candidates_reach_the_queue_after_their_rollouts(kafka_settings, tmp_path):
    rollouts_topic = private_topic(kafka_settings)
    queue = _topic(kafka_settings, "annotation-queue")
    worker = _worker(
        kafka_settings,
        tmp_path,
        rollouts_topic=rollouts_topic,
        annotation_topic=queue,
        annotation_min_disagreement=0.1,
    )
    completion = policy_pb2.Completion(
        prompt_index=0,
        prompt_token_ids=[1, 2],
        samples=[
            policy_pb2.Sample(response_id=f"r{k}", token_ids=[3], logprobs=[-0.5], text=f"a{k}")
            for k in range(2)
        ],
    )
    scored = reward_pb2.ScoreResponse(
        scores=[0.5, 0.5],
        spreads=[0.5, 0.5],
        ensemble_size=2,
        member_scores=[0.0, 1.0, 1.0, 0.0],  # the members order the two answers oppositely
        reward_model_version=3,
    )
    prompts = [common_pb2.Prompt(text="Which is better?")]
    rollouts = build_rollouts(
        [completion], list(scored.scores), [[-0.7]] * 2, prompts, 3, spreads=list(scored.spreads)
    )
    candidates = annotation_candidates(rollouts, scored, 0.1)
    assert len(candidates) == 1
    try:
        worker.publish(rollouts, candidates)
    finally:
        worker.close()
    assert worker.registry.get_sample_value("rlhf_rollout_annotation_candidates_total") == 1
    assert worker.registry.get_sample_value("rlhf_rollout_reward_spread_mean") == 0.5
    (record,) = _read(kafka_settings, queue, 1)
    got = decode(events_pb2.AnnotationCandidate, record.value)
    assert record.key == rollouts[0].group_id.encode() and got == candidates[0]
    assert list(got.response_ids) == ["r0", "r1"] and got.prompt_text == "Which is better?"
    published = {
        decode(events_pb2.Rollout, r.value).rollout_id
        for r in _read(kafka_settings, rollouts_topic, 2)
    }
    assert published == set(got.response_ids)
