"""Kafka records describe themselves, and the topics are what the table says.

Records written by the platform's two producers (kafka-python in the workers, librdkafka in the
gateway) carry `content-type` and `message-type` headers. Kafka's own console consumer shows
them, and a process that has only the descriptor set of `rlhf schema`, the headers and a Kafka
client (no code of this repository) decodes the values. `rlhf topics` creates and checks topics
through the Admin API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
from google.protobuf import json_format

from services.common import topics
from services.common.kafka import check_topics, ensure_topics, make_producer
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import running_gateway

REPO = Path(__file__).resolve().parents[2]

# Runs outside the repository (cwd=/, no PYTHONPATH): only google.protobuf and kafka-python.
FOREIGN_CONSUMER = textwrap.dedent(
    """
    import json, sys
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
    from kafka import KafkaConsumer, TopicPartition

    servers, topic, partition, offset, schema = sys.argv[1:6]
    try:
        import services  # noqa: F401
        sys.exit("the repository is importable: this would not prove anything")
    except ImportError:
        pass
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(open(schema, "rb").read()).file:
        pool.Add(f)
    consumer = KafkaConsumer(bootstrap_servers=servers.split(","))
    tp = TopicPartition(topic, int(partition))
    consumer.assign([tp])
    consumer.seek(tp, int(offset))
    record = next(r for batch in iter(lambda: consumer.poll(1000), None)
                  for r in batch.get(tp, []))
    headers = {k: v.decode() for k, v in record.headers}
    assert headers["content-type"] == "application/x-protobuf", headers
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(headers["message-type"]))
    print(json.dumps({"type": headers["message-type"],
                      "value": json_format.MessageToDict(cls.FromString(record.value))}))
    """
)


def rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def decode_elsewhere(kafka_settings, topic: str, partition: int, offset: int) -> dict:
    schema = rlhf("schema")
    assert schema.returncode == 0, schema.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [kafka_settings.bootstrap_servers, topic, str(partition), str(offset)]
    out = subprocess.run(
        [sys.executable, "-c", FOREIGN_CONSUMER, *args, schema.stdout.strip()],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def console_consumer_headers(kafka_broker, topic: str, partition: int, offset: int) -> str:
    """The headers of one record as Kafka's kafka-console-consumer prints them."""
    argv = kafka_broker._java(
        "org.apache.kafka.tools.consumer.ConsoleConsumer",
        "--bootstrap-server",
        kafka_broker.bootstrap_servers,
        "--topic",
        topic,
        "--partition",
        str(partition),
        "--offset",
        str(offset),
        "--max-messages",
        "1",
        "--property",
        "print.headers=true",
        "--property",
        "print.value=false",
        "--timeout-ms",
        "30000",
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_worker_records_decode_with_only_the_descriptor_set(kafka_settings, kafka_broker):
    assert shutil.which("java")
    rollout = events_pb2.Rollout(
        rollout_id=f"r-{uuid.uuid4().hex[:8]}",
        group_id="g",
        prompt_token_ids=[1, 2],
        response_token_ids=[3],
        behaviour_logprobs=[-0.5],
        reward=0.25,
        weights_version=3,
    )
    producer = make_producer(kafka_settings)
    meta = producer.send(topics.ROLLOUTS, key=rollout.rollout_id, value=rollout).get(30)
    producer.close()
    headers = console_consumer_headers(kafka_broker, topics.ROLLOUTS, meta.partition, meta.offset)
    assert headers == "content-type:application/x-protobuf,message-type:rlhf.v1.Rollout"
    found = decode_elsewhere(kafka_settings, topics.ROLLOUTS, meta.partition, meta.offset)
    assert found == {"type": "rlhf.v1.Rollout", "value": json_format.MessageToDict(rollout)}


def test_gateway_records_decode_with_only_the_descriptor_set(kafka_settings, run_dir):
    from kafka import KafkaConsumer, TopicPartition

    rid = f"resp-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers)
    parts = [
        TopicPartition(topics.FEEDBACK, p) for p in consumer.partitions_for_topic(topics.FEEDBACK)
    ]
    before = consumer.end_offsets(parts)
    with running_gateway(kafka_settings, run_dir / "gateway-schema") as gw:
        r = httpx.post(
            f"{gw.url}/v1/feedback",
            json={"response_id": rid, "thumb": "up", "comment": "clear"},
            headers=gw.headers,
            timeout=10,
        )
        assert r.status_code == 202, r.text
    after = consumer.end_offsets(parts)
    consumer.close()
    [tp] = [tp for tp in parts if after[tp] > before[tp]]
    found = decode_elsewhere(kafka_settings, topics.FEEDBACK, tp.partition, before[tp])
    assert found["type"] == "rlhf.v1.FeedbackEvent"
    assert found["value"]["responseId"] == rid
    assert found["value"]["thumb"] == "THUMB_UP" and found["value"]["comment"] == "clear"


def test_topics_ensure_and_check_through_the_admin_api(kafka_settings):
    ok = rlhf("topics", "check", "--bootstrap-servers", kafka_settings.bootstrap_servers)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["problems"] == []
    again = rlhf("topics", "ensure", "--bootstrap-servers", kafka_settings.bootstrap_servers)
    assert again.returncode == 0 and json.loads(again.stdout)["created"] == []

    name = f"drift-{uuid.uuid4().hex[:6]}"
    made = topics.TopicSpec(name, 1, {"retention.ms": "1000"})
    assert ensure_topics(kafka_settings, [made]) == [name]
    assert ensure_topics(kafka_settings, [made]) == []  # existing topics are kept
    assert check_topics(kafka_settings, [made]) == []
    wanted = topics.TopicSpec(name, 2, {"retention.ms": "-1", "cleanup.policy": "compact"})
    missing = topics.TopicSpec(f"{name}-missing", 1)
    assert check_topics(kafka_settings, [wanted, missing]) == [
        f"{name}: 1 partitions, the table says 2",
        f"{name}: retention.ms=1000, the table says -1",
        f"{name}: cleanup.policy=None, the table says compact",
        f"{name}-missing: missing",
    ]
