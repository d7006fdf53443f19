"""OpenAI-compatible chat completions through the real gateway to a real policy service (Triton
on CPU, tiny model): the `id` is the policy's response id, the same id keys the generation
record in Kafka, and streaming sends server-sent chunks that add up to the answer."""

from __future__ import annotations

import json

import httpx

from services.common import topics
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import read_topic

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_completion_id_is_the_policy_response_id(chat_gateway, policy, kafka_settings):
    body = {
        "model": policy.model_name,
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0,
        "seed": 3,
    }
    reply = httpx.post(
        f"{chat_gateway.url}/v1/chat/completions",
        json=body,
        headers=chat_gateway.headers,
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    completion = reply.json()
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    assert choice["response_id"] == completion["id"]
    assert choice["finish_reason"] in {"stop", "length"}
    assert 1 <= completion["usage"]["completion_tokens"] <= 6
    assert completion["system_fingerprint"] == f"weights-v{policy.weights_version}"

    generations = read_topic(
        kafka_settings,
        topics.GENERATIONS,
        events_pb2.GenerationRecord,
        lambda found: any(g.response_id == completion["id"] for g in found),
    )
    (generation,) = [g for g in generations if g.response_id == completion["id"]]
    assert generation.response_text == choice["message"]["content"]
    assert [m.content for m in generation.prompt.messages.messages] == ["Be brief.", "Hello there"]


def test_streaming_chunks_add_up_to_the_answer(chat_gateway, policy):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "seed": 3}
    with httpx.stream(
        "POST",
        f"{chat_gateway.url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=chat_gateway.headers,
        timeout=120,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # Greedy decoding with one seed: the unary answer is the same text.
    unary = httpx.post(
        f"{chat_gateway.url}/v1/chat/completions",
        json=body,
        headers=chat_gateway.headers,
        timeout=120,
    ).json()
    assert streamed == unary["choices"][0]["message"]["content"]


def test_models_and_readiness(chat_gateway, policy):
    models = httpx.get(f"{chat_gateway.url}/v1/models", headers=chat_gateway.headers, timeout=30)
    assert models.status_code == 200
    (card,) = models.json()["data"]
    assert (card["id"], card["weights_version"]) == (policy.model_name, policy.weights_version)
    ready = httpx.get(f"{chat_gateway.url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"kafka": True, "policy": True}
