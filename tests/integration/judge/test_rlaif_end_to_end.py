"""RLAIF end to end on real components: the policy service (tiny model in the real Triton) answers
each prompt twice, the rule-based judge labels the pairs with `publish`, the PreferenceRecords
arrive on the real Kafka broker with source AI and their AiLabel, the refresh's reader takes them,
and the reward trainer trains on them."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from services.common import topics
from services.common.preferences import prompt_hash
from services.common.training.reward import RewardConfig, run_train_reward
from services.genproto.rlhf.v1 import common_pb2, events_pb2, judge_pb2, policy_pb2, policy_pb2_grpc
from services.refresh.worker import read_preference
from tests.integration.judge.judge_stack import judge_stack
from tests.support.policy_stack import policy_stack

RULE = "tests.integration.judge.rules:longer"


def chat(text: str) -> common_pb2.Prompt:
    message = common_pb2.ChatMessage(role="user", content=text)
    return common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=[message]))


def end_offsets(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    return consumer.end_offsets(parts)


def read_records(kafka_settings, start: dict, ids: set[str], timeout_s: float = 60) -> dict:
    """preference_id -> (Kafka record, decoded value) for `ids`, read from `start` offsets."""
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers, enable_auto_commit=False)
    found: dict = {}
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while set(found) != ids and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    value = events_pb2.PreferenceRecord.FromString(record.value)
                    if value.preference_id in ids:
                        found[value.preference_id] = (record, value)
    finally:
        consumer.close()
    return found


@pytest.fixture(scope="module")
def policy(triton_server, tiny_lm_dir, tmp_path_factory):
    with policy_stack(triton_server, None, tiny_lm_dir, tmp_path_factory.mktemp("policy")) as stack:
        yield stack


def test_ai_labels_reach_kafka_and_train_the_reward_model(
    policy, kafka_settings, tiny_rm_dir, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    questions = [
        f"Tell me about {thing} ({tag})." for thing in ("rivers", "bread", "stars", "owls")
    ]
    # 1. The policy answers every prompt twice (sampled, seeded).
    generated = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(policy.address)).Generate(
        policy_pb2.GenerateRequest(
            prompts=[chat(q) for q in questions],
            sampling=policy_pb2.SamplingParams(
                n=2, max_new_tokens=12, temperature=1.0, seed=7, has_seed=True
            ),
        ),
        timeout=120,
    )
    samples = [list(c.samples) for c in generated.completions]
    assert all(len(s) == 2 for s in samples)

    # 2. The judge labels each pair and publishes before it answers.
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers)
    start = end_offsets(consumer, topics.PREFERENCES)
    consumer.close()
    with judge_stack(None, annotator=RULE, kafka=kafka_settings) as judge:
        response = judge.stub().Compare(
            judge_pb2.CompareRequest(
                publish=True,
                pairs=[
                    judge_pb2.JudgedPair(
                        prompt=chat(q),
                        answer_a=a.text,
                        answer_b=b.text,
                        response_id_a=a.response_id,
                        response_id_b=b.response_id,
                    )
                    for q, (a, b) in zip(questions, samples)
                ],
            ),
            timeout=60,
        )
        published_metric = judge.metric("rlhf_judge_labels_published_total")
    assert response.judge_model == RULE
    assert response.rubric_version == "rules"

    expected = {}
    for q, (a, b), verdict in zip(questions, samples, response.verdicts):
        if len(a.text) == len(b.text):  # a tie: no label
            assert verdict.p_a_better == 0.5 and verdict.preference_id == ""
            continue
        a_wins = len(a.text) > len(b.text)
        assert verdict.p_a_better == (1.0 if a_wins else 0.0)
        assert verdict.confidence == 1.0
        assert verdict.preference_id
        chosen, rejected = (a, b) if a_wins else (b, a)
        expected[verdict.preference_id] = (q, chosen, rejected)
    assert len(expected) >= 2, "too many ties to test with"
    assert response.published == len(expected) == published_metric

    # 3. The records are on the real broker, keyed by prompt hash, with source AI and the label.
    found = read_records(kafka_settings, start, set(expected))
    assert set(found) == set(expected)
    rows = []
    for pid, (kafka_record, record) in found.items():
        q, chosen, rejected = expected[pid]
        assert kafka_record.key.decode() == prompt_hash(q)
        assert record.source == events_pb2.PREFERENCE_SOURCE_AI
        assert (record.prompt, record.pair.chosen, record.pair.rejected) == (
            q,
            chosen.text,
            rejected.text,
        )
        assert record.conversation.messages.messages[0].content == q
        assert list(record.derived_from) == [s.response_id for s in samples[questions.index(q)]]
        assert record.ai.judge_model == RULE
        assert record.ai.rubric_version == "rules"
        assert record.ai.p_chosen_better == 1.0
        assert record.ai.confidence == 1.0
        # 4. The refresh's reader accepts the record as it comes off the topic.
        taken = read_preference(kafka_record.value)
        rows.append(
            {"prompt": taken.prompt, "chosen": taken.pair.chosen, "rejected": taken.pair.rejected}
        )

    # 5. The reward trainer trains on exactly these rows.
    data = tmp_path / "ai-pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_train_reward(
        RewardConfig(
            data=data,
            output=tmp_path / "rm",
            model=tiny_rm_dir,
            eval_fraction=0.0,
            batch_size=2,
            max_length=128,
        )
    )
    assert summary["data"]["train"]["records"] == len(rows)
    assert summary["steps"] == -(-len(rows) // 2)
    assert (tmp_path / "rm" / "model.safetensors").is_file()
