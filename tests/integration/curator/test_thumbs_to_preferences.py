"""Thumbs posted over HTTP to the real gateway end up, joined with their generations, as
preference records in the real Kafka; feedback that arrives before its generation waits for it;
a restarted curator (same state folder and group) emits nothing twice, even when the same
idempotency key reaches Kafka a second time through another gateway replica. The annotator
cohort posted with the thumbs is on the records derived from them."""

from __future__ import annotations

import uuid

import httpx
import pytest

from services.common import topics
from services.common.kafka import make_producer
from services.genproto.rlhf.v1 import common_pb2, events_pb2
from tests.integration.curator.curator_steps import make_worker, step_for, step_until
from tests.integration.gateway.gateway_process import read_topic, running_gateway


@pytest.fixture()
def gateway_factory(kafka_settings, run_dir):
    def start():
        return running_gateway(kafka_settings, run_dir / "gateway", rate_limit_burst=1000)

    return start


def _generation(prompt: str, response: str) -> events_pb2.GenerationRecord:
    # What the policy saw is its chat template; the records carry the question as asked.
    templated = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return events_pb2.GenerationRecord(
        response_id=f"gen-{uuid.uuid4().hex}",
        response_text=response,
        prompt_text=templated,
        prompt=common_pb2.Prompt(
            messages=common_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role="user", content=prompt)]
            )
        ),
        weights_version=1,
        model="policy",
    )


def _summary(records, prompt: str) -> list[tuple]:
    out = []
    for r in records:
        if r.prompt != prompt:
            continue
        if r.WhichOneof("kind") == "pair":
            out.append(("pair", r.pair.chosen, r.pair.rejected))
        else:
            out.append(("label", r.label.completion, r.label.desirable))
    return sorted(out)


def test_live_thumbs_become_pairs_and_labels_once(kafka_settings, gateway_factory, tmp_path):
    prompt = f"Capital of France? ({uuid.uuid4().hex[:6]})"
    good, bad = _generation(prompt, "Paris."), _generation(prompt, "Lyon, probably.")
    producer = make_producer(kafka_settings)
    # Only the good answer's generation is in Kafka before the thumbs.
    producer.send(topics.GENERATIONS, key=good.response_id, value=good).get(timeout=30)

    thumbs = [
        {
            "response_id": good.response_id,
            "thumb": "up",
            "cohort": "vendor-a",
            "idempotency_key": f"k-{good.response_id}",
        },
        {
            "response_id": bad.response_id,
            "thumb": "down",
            "cohort": "vendor-a",
            "idempotency_key": f"k-{bad.response_id}",
        },
    ]
    with gateway_factory() as gw:
        for body in thumbs:
            r = httpx.post(f"{gw.url}/v1/feedback", json=body, headers=gw.headers, timeout=10)
            assert r.status_code == 202, r.text

    state = tmp_path / "curator"
    worker = make_worker(kafka_settings, state)
    try:
        step_until(worker, lambda out: ("label", "Paris.", True) in _summary(out, prompt))
        assert worker.store.pending_count() >= 1  # the thumbs-down waits for its generation
        producer.send(topics.GENERATIONS, key=bad.response_id, value=bad).get(timeout=30)
        step_until(worker, lambda out: any(t[0] == "pair" for t in _summary(out, prompt)))
        group = worker.settings.group_id
    finally:
        worker.close()

    expected = [
        ("label", "Lyon, probably.", False),
        ("label", "Paris.", True),
        ("pair", "Paris.", "Lyon, probably."),
    ]
    stored = read_topic(
        kafka_settings,
        topics.PREFERENCES,
        events_pb2.PreferenceRecord,
        lambda found: _summary(found, prompt) == expected,
    )
    assert _summary(stored, prompt) == expected
    pair = next(r for r in stored if r.prompt == prompt and r.WhichOneof("kind") == "pair")
    assert list(pair.derived_from) == [good.response_id, bad.response_id]
    assert pair.source == events_pb2.PREFERENCE_SOURCE_LIVE_FEEDBACK
    # Both thumbs came from one cohort: every record derived from them carries it.
    assert {r.cohort for r in stored if r.prompt == prompt} == {"vendor-a"}

    # The same idempotency keys again, through a fresh gateway replica (no shared cache): the
    # events reach Kafka a second time with the same feedback ids. A restarted curator (same
    # state folder and group) recognises them, and re-emits nothing.
    with gateway_factory() as gw:
        for body in thumbs:
            assert (
                httpx.post(f"{gw.url}/v1/feedback", json=body, headers=gw.headers).status_code
                == 202
            )
    worker = make_worker(kafka_settings, state, group_id=group)
    try:
        again = step_until(worker, lambda _: worker.metrics.duplicates._value.get() >= 2)
        again += step_for(worker, 2.0)
        assert _summary(again, prompt) == []
    finally:
        worker.close()
    producer.close()
    stored = read_topic(kafka_settings, topics.PREFERENCES, events_pb2.PreferenceRecord)
    assert _summary(stored, prompt) == expected
