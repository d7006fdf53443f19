"""The OpenAI-compatible routes over HTTP against a stand-in policy: every field of the `openai`
package's request types is accepted, each is honoured, ignored (with a warning) or refused (400
naming it), every error is OpenAI's error object, and the conversion to the policy's
SamplingParams and back to OpenAI's answers (unary and streamed) is what OpenAI documents."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from openai.types import completion_create_params as legacy_params
from openai.types.chat import completion_create_params as chat_params

from services.gateway.app import create_app
from services.gateway.auth import sha256_hex
from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.serving import TOP_P_ZERO, ServedModels, sampling_params
from services.gateway.settings import GatewaySettings
from tests.unit.gateway.policy_fake import SERVED, FakePolicyClient, rpc_error

KEY = "unit-test-key"
DOC = Path(__file__).resolve().parents[3] / "docs" / "openai-compatibility.md"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def policy() -> FakePolicyClient:
    return FakePolicyClient()


@pytest.fixture()
def client(policy) -> TestClient:
    settings = GatewaySettings(api_key_sha256=[sha256_hex(KEY)], rate_limit_burst=1000)
    app = create_app(settings)  # not entered: no lifespan, no Kafka; the policy is a stand-in
    app.state.policy = policy
    app.state.models = ServedModels(policy, settings.model_aliases)
    return TestClient(app)


def post(client: TestClient, body: dict, path: str = "/v1/chat/completions"):
    return client.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def openai_fields(module) -> set[str]:
    base = module.CompletionCreateParamsBase
    return set(base.__required_keys__ | base.__optional_keys__) | {"stream"}


def doc_table(heading: str) -> dict[str, str]:
    """`field -> status cell` from the table under `heading` in docs/openai-compatibility.md."""
    section = DOC.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `([a-z_.]+)` \| ((?:supported|ignored|refused)[^|]*) \|", section, re.MULTILINE
    )
    return dict(rows)


# ----- every field -----


def test_every_field_of_the_openai_package_is_in_the_schemas():
    assert openai_fields(chat_params) - set(ChatCompletionRequest.model_fields) == set()
    assert openai_fields(legacy_params) - set(CompletionRequest.model_fields) == set()


def test_the_compatibility_table_gives_every_field_a_status():
    chat = doc_table("POST /v1/chat/completions")
    legacy = doc_table("POST /v1/completions")
    assert openai_fields(chat_params) - set(chat) == set()
    assert openai_fields(legacy_params) - set(legacy) == set()
    for table in (chat, legacy):
        assert set(table) <= set(ChatCompletionRequest.model_fields) | set(
            CompletionRequest.model_fields
        ) | {"stream_options.include_usage", "stream_options.include_obfuscation"}


REFUSED = [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}
            ]
        },
        "messages[0].content[0].type",
    ),
    (
        {"messages": [*USER, {"role": "tool", "content": "42", "tool_call_id": "c1"}]},
        "messages[1].role",
    ),
    (
        {
            "messages": [
                *USER,
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
            ]
        },
        "messages[1].tool_calls",
    ),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED)
def test_what_the_policy_cannot_do_is_refused_naming_the_field(client, policy, fields, param):
    error = error_of(post(client, {"messages": USER, **fields}))
    assert (error["param"], error["type"], error["code"]) == (
        param,
        "invalid_request_error",
        "unsupported_parameter",
    )
    assert policy.stub.requests == []  # nothing reached the policy


def test_refusals_match_the_table():
    table = doc_table("POST /v1/chat/completions")
    refused = {param.split("[")[0].split(".")[0] for _, param in REFUSED}
    assert refused <= {f for f, status in table.items() if "refused" in status} | {
        "messages",
        "top_logprobs",
        "stream_options",
    }


IGNORED = {
    "store": True,
    "metadata": {"team": "search"},
    "service_tier": "flex",
    "prompt_cache_key": "k1",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit"},
    "safety_identifier": "hash-of-user",
    "prediction": {"type": "content", "content": "Hello"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "parallel_tool_calls": False,
}


def test_hosting_fields_are_accepted_and_logged_as_ignored(client, policy, caplog):
    table = doc_table("POST /v1/chat/completions")
    assert {f for f, status in table.items() if status == "ignored"} >= set(IGNORED)
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    with caplog.at_level(logging.WARNING, logger="services.gateway.serving"):
        response = post(client, {"messages": messages, **IGNORED})
    assert response.status_code == 200, response.text
    (record,) = [r for r in caplog.records if "ignored OpenAI fields" in r.getMessage()]
    assert set(record.fields["ignored"]) == {*IGNORED, "messages[0].name"}
    (request,) = policy.stub.requests
    assert request.prompts[0].messages.messages[0].content == "hi"


# ----- errors -----


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "presence_penalty": -2.5}, "presence_penalty"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": USER, "logit_bias": {"not-an-id": 1}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": USER, "response_format": {"type": "yaml"}}, "response_format.type"),
        ({"messages": USER, "mood": "happy"}, "mood"),
    ],
)
def test_validation_errors_are_400_naming_the_param(client, body, param):
    error = error_of(post(client, body))
    assert (error["param"], error["type"]) == (param, "invalid_request_error")


def test_not_json_and_wrong_auth_and_rate_limit_are_openai_errors(client):
    bad_json = client.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert error_of(bad_json)["param"] is None
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.post("/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    client.app.state.rate_limiter.burst = 0.0
    limited = post(client, {"messages": USER})
    assert error_of(limited, 429)["type"] == "rate_limit_error"
    assert int(limited.headers["Retry-After"]) >= 1


def test_max_tokens_above_the_gateway_limit_names_the_field_given(client):
    client.app.state.settings.max_new_tokens_limit = 16
    assert error_of(post(client, {"messages": USER, "max_tokens": 17}))["param"] == "max_tokens"
    body = {"messages": USER, "max_tokens": 8, "max_completion_tokens": 17}
    assert error_of(post(client, body))["param"] == "max_completion_tokens"


@pytest.mark.parametrize(
    ("code", "details", "status", "param", "error_code"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.logit_bias: token id 9",
            400,
            "logit_bias",
            None,
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompts[0].messages[1].content: empty message",
            400,
            "messages[1].content",
            None,
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_new_tokens: 9 leaves",
            400,
            "max_tokens",
            None,
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "model: unknown model 'x'",
            404,
            "model",
            "model_not_found",
        ),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", 503, None, "service_unavailable"),
        (grpc.StatusCode.UNAVAILABLE, "Kafka", 503, None, "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "late", 504, None, "timeout"),
        (grpc.StatusCode.INTERNAL, "bug", 502, None, "bad_gateway"),
    ],
)
def test_policy_errors_become_openai_errors(
    client, policy, code, details, status, param, error_code
):
    policy.stub.error = rpc_error(code, details)
    for stream in (False, True):
        response = post(client, {"messages": USER, "stream": stream})
        error = error_of(response, status)
        assert (error["param"], error["code"]) == (param, error_code)
        assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
        if status == 503:
            assert response.headers["Retry-After"] == "1"


# ----- models -----


def test_unknown_model_is_404_model_not_found(client, policy):
    error = error_of(post(client, {"model": "nope", "messages": USER}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert error_of(client.get("/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert policy.stub.requests == []


def test_served_name_and_alias_are_served(client, policy):
    for name, sent in ((SERVED, SERVED), ("policy", "")):
        response = post(client, {"model": name, "messages": USER})
        assert response.status_code == 200, response.text
        assert policy.stub.requests[-1].model == sent
        assert response.json()["model"] == SERVED
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in listed["data"]] == [SERVED]
    policy.stub.served = "renamed"  # a restarted policy with another name is seen on a miss
    assert post(client, {"model": "renamed", "messages": USER}).status_code == 200
    assert error_of(post(client, {"model": SERVED, "messages": USER}), 404)


# ----- conversion -----


def test_sampling_params_follow_openai_semantics():
    chat = ChatCompletionRequest(
        messages=USER,
        max_tokens=9,
        max_completion_tokens=5,
        top_p=0.0,
        seed=-1,
        n=3,
        logit_bias={"7": -100, "12": 2.5},
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logprobs=True,
        top_logprobs=4,
        stop="END",
    )
    s = sampling_params(chat, max_new_tokens_limit=64)
    assert (s.max_new_tokens, s.n, s.stop) == (5, 3, ["END"])  # max_completion_tokens wins
    assert s.top_p == pytest.approx(TOP_P_ZERO)  # OpenAI's 0 keeps one token, not all
    assert (s.seed, s.has_seed) == (2**64 - 1, True)
    assert dict(s.logit_bias) == {7: -100.0, 12: 2.5}
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -1.0)
    assert (s.top_logprobs, s.token_logprobs) == (4, True)
    plain = sampling_params(ChatCompletionRequest(messages=USER), max_new_tokens_limit=64)
    assert (plain.n, plain.temperature, plain.top_p, plain.max_new_tokens) == (1, 1.0, 1.0, 64)
    assert (plain.has_seed, plain.token_logprobs, plain.top_logprobs) == (False, False, 0)
    legacy = sampling_params(CompletionRequest(prompt="Once", logprobs=0), 64)
    assert (legacy.max_new_tokens, legacy.token_logprobs, legacy.top_logprobs) == (16, True, 0)


def test_messages_become_the_policy_chat(client, policy):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "refusal": "I can't."},
        {"role": "user", "content": "ok"},
    ]
    assert post(client, {"messages": messages}).status_code == 200
    sent = [(m.role, m.content) for m in policy.stub.requests[0].prompts[0].messages.messages]
    assert sent == [
        ("system", "Be brief."),
        ("user", "a\nb"),
        ("assistant", "I can't."),
        ("user", "ok"),
    ]


def test_unary_answer_with_logprobs_and_n(client):
    body = {"messages": USER, "n": 2, "logprobs": True, "top_logprobs": 2, "user": "u-7"}
    completion = post(client, body).json()
    assert completion["id"] == "r-0-0" and completion["system_fingerprint"] == "weights-v3"
    assert [c["response_id"] for c in completion["choices"]] == ["r-0-0", "r-0-1"]
    assert completion["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    first = completion["choices"][1]["logprobs"]["content"][0]
    assert (first["token"], first["logprob"], first["bytes"]) == ("Hel", -1.25, [72, 101, 108])
    assert [(t["token"], t["logprob"]) for t in first["top_logprobs"]] == [
        ("Hel", -1.25),
        ("?", -2),
    ]
    assert post(client, {"messages": USER}).json()["choices"][0]["logprobs"] is None


def events(response) -> list:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_streamed_n_choices_with_usage_in_a_last_chunk(client):
    body = {"messages": USER, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(post(client, body))
    *choice_chunks, last = chunks
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 6,
        "total_tokens": 10,
    }
    assert all(c["usage"] is None for c in choice_chunks)
    assert {c["id"] for c in chunks} == {"s-0"}
    assert {c["model"] for c in chunks} == {SERVED}  # asked as the alias `policy`
    for j in (0, 1):
        mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == j]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello!"
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert {c["response_id"] for c in mine} == {f"s-{j}"}
    no_usage = events(post(client, {"messages": USER, "stream": True}))
    assert all("usage" not in c and c["choices"] for c in no_usage)


def test_streamed_logprobs_come_with_their_tokens(client):
    body = {"messages": USER, "stream": True, "logprobs": True, "top_logprobs": 1}
    content = [c["choices"][0] for c in events(post(client, body)) if c["choices"][0]["logprobs"]]
    assert [c["delta"]["content"] for c in content] == ["Hel", "lo", "!"]
    assert [c["logprobs"]["content"][0]["token"] for c in content] == ["Hel", "lo", "!"]
    assert all(len(c["logprobs"]["content"][0]["top_logprobs"]) == 1 for c in content)


def test_an_error_mid_stream_is_an_error_event_then_done(client, policy):
    policy.stub.stream_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "Triton went away")
    chunks = events(post(client, {"messages": USER, "stream": True}))
    assert chunks[-1]["error"]["type"] == "server_error"
    assert "Triton went away" in chunks[-1]["error"]["message"]


# ----- legacy completions -----


def test_legacy_completions_several_prompts_and_logprobs(client, policy):
    body = {"prompt": ["Once", "Twice"], "n": 2, "logprobs": 1, "max_tokens": 5}
    completion = post(client, body, "/v1/completions").json()
    assert completion["object"] == "text_completion"
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2, 3]
    assert [c["response_id"] for c in completion["choices"]] == ["r-0-0", "r-0-1", "r-1-0", "r-1-1"]
    logprobs = completion["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Hel", "lo", "!"] and logprobs["text_offset"] == [0, 3, 5]
    assert logprobs["top_logprobs"] == [{"Hel": -0.25}, {"lo": -0.25}, {"!": -0.25}]
    (request,) = policy.stub.requests
    assert [p.text for p in request.prompts] == ["Once", "Twice"]  # no chat template
    assert completion["usage"]["prompt_tokens"] == 8


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
def test_legacy_refusals(client, fields, param):
    error = error_of(post(client, {"prompt": "Once", **fields}, "/v1/completions"))
    assert error["param"] == param


def test_legacy_stream_and_usage(client):
    body = {"prompt": "Once", "stream": True, "stream_options": {"include_usage": True}}
    *chunks, last = events(post(client, body, "/v1/completions"))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 3 and last["choices"] == []


def test_user_is_logged_with_the_response_id_streamed_or_not(client, caplog):
    with caplog.at_level(logging.INFO, logger="services.gateway.serving"):
        post(client, {"messages": USER, "user": "end-user-9"})
        events(post(client, {"messages": USER, "user": "end-user-9", "stream": True}))
        post(client, {"messages": USER})
    served = [r.fields for r in caplog.records if r.getMessage() == "OpenAI end user served"]
    assert served == [
        {"user": "end-user-9", "response_id": "r-0-0"},
        {"user": "end-user-9", "response_id": "s-0"},
    ]
