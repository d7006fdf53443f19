"""The whole live loop on real parts: two answers from the real policy (through
/v1/chat/completions, n=2), thumbs up on one and down on the other over HTTP, and the curator
joins them with the generation records the policy logged into a chosen/rejected pair."""

from __future__ import annotations

import uuid

import httpx

from services.common import topics
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.curator.curator_steps import make_worker, step_until
from tests.integration.gateway.gateway_process import read_topic


def test_served_answers_rated_in_opposite_ways_become_a_pair(
    chat_gateway, kafka_settings, tmp_path
):
    question = f"Tell me a fact ({uuid.uuid4().hex[:6]})"
    reply = httpx.post(
        f"{chat_gateway.url}/v1/chat/completions",
        headers=chat_gateway.headers,
        timeout=120,
        json={
            "messages": [{"role": "user", "content": question}],
            "n": 2,
            "max_tokens": 8,
            "temperature": 1.0,
            "seed": 11,
        },
    )
    assert reply.status_code == 200, reply.text
    first, second = reply.json()["choices"]
    assert first["message"]["content"] != second["message"]["content"]
    for choice, thumb in ((first, "up"), (second, "down")):
        r = httpx.post(
            f"{chat_gateway.url}/v1/feedback",
            headers=chat_gateway.headers,
            json={"response_id": choice["response_id"], "thumb": thumb},
        )
        assert r.status_code == 202

    ids = {first["response_id"], second["response_id"]}
    worker = make_worker(kafka_settings, tmp_path / "curator")
    try:
        step_until(
            worker,
            lambda out: any(
                r.WhichOneof("kind") == "pair" and set(r.derived_from) == ids for r in out
            ),
            timeout_s=90,
        )
    finally:
        worker.close()
    stored = read_topic(kafka_settings, topics.PREFERENCES, events_pb2.PreferenceRecord)
    (pair,) = [r for r in stored if r.WhichOneof("kind") == "pair" and set(r.derived_from) == ids]
    assert (pair.pair.chosen, pair.pair.rejected) == (
        first["message"]["content"],
        second["message"]["content"],
    )
    assert question in pair.prompt  # the prompt as the model saw it (chat template applied)
