"""The gateway's own request schemas over HTTP: bad input is a 422 that names the field, and it
never reaches Kafka (the app here runs without its lifespan: no producer exists at all). The
OpenAI-compatible routes answer OpenAI's error object instead: tests/unit/gateway/test_openai.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.auth import sha256_hex
from services.gateway.settings import GatewaySettings

KEY = "unit-test-key"


@pytest.fixture()
def client() -> TestClient:
    settings = GatewaySettings(api_key_sha256=[sha256_hex(KEY)], rate_limit_burst=1000)
    return TestClient(create_app(settings))  # not entered: no lifespan, no Kafka


def _post(client: TestClient, path: str, body: dict):
    return client.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})


def _fields(response) -> set[str]:
    assert response.status_code == 422, response.text
    return {".".join(str(p) for p in err["loc"][1:]) for err in response.json()["detail"]}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/feedback", {"response_id": "r1", "thumb": "sideways"}, "thumb"),
        ("/v1/feedback", {"response_id": "r1"}, "rating"),  # neither thumb nor rating
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "rating": 5}, "rating"),  # both
        ("/v1/feedback", {"response_id": "r1", "rating": 6}, "rating"),
        ("/v1/feedback", {"response_id": "", "thumb": "up"}, "response_id"),
        ("/v1/feedback", {"response_id": "a b", "thumb": "up"}, "response_id"),
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "mood": "happy"}, "mood"),
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "comment": "x" * 4001}, "comment"),
        (
            "/v1/feedback",
            {"response_id": "r1", "thumb": "up", "categories": ["a"] * 17},
            "categories",
        ),
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "categories": [""]}, "categories.0"),
        (
            "/v1/feedback",
            {"response_id": "r1", "thumb": "up", "idempotency_key": "k" * 129},
            "idempotency_key",
        ),
        ("/v1/preferences", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected"),
        ("/v1/preferences", {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
        ("/v1/rankings", {"prompt": "p", "responses": ["only one"]}, "responses"),
        ("/v1/rankings", {"prompt": "p", "responses": ["a", "a"]}, "responses"),
        ("/v1/rankings", {"prompt": "p", "responses": ["a", ""]}, "responses.1"),
        ("/v1/rankings", {"prompt": "p", "responses": [str(i) for i in range(17)]}, "responses"),
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "cohort": "a b"}, "cohort"),
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "cohort": "c" * 65}, "cohort"),
        ("/v1/feedback", {"response_id": "r1", "thumb": "up", "cohort": ""}, "cohort"),
        ("/v1/preferences", {"prompt": "p", "chosen": "a", "rejected": "b", "cohort": 7}, "cohort"),
        ("/v1/rankings", {"prompt": "p", "responses": ["a", "b"], "cohort": "x/y"}, "cohort"),
        (
            "/v1/rankings",
            {"prompt": "p", "responses": ["a", "b"], "candidate_id": "no spaces"},
            "candidate_id",
        ),
        (
            "/v1/preferences",
            {"prompt": "p", "chosen": "a", "rejected": "b", "candidate_id": "k" * 129},
            "candidate_id",
        ),
    ],
)
def test_bad_input_is_422_naming_the_field(client, path, body, field):
    assert field in _fields(_post(client, path, body))


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/feedback",
        "/v1/preferences",
        "/v1/rankings",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(paths)
    assert "/v1/bench/noop" not in paths  # the benchmark baseline is off unless configured
    assert set(paths["/v1/feedback"]["post"]["responses"]) >= {"202", "401", "422", "429", "503"}
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) >= {"200", "400", "401", "404", "429", "503", "504"} and "422" not in chat
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


def test_settings_refuse_to_start_without_keys_or_with_wildcard_cors(monkeypatch):
    monkeypatch.delenv("RLHF_GATEWAY_API_KEY_SHA256", raising=False)
    with pytest.raises(ValueError, match="api_key_sha256"):
        GatewaySettings()
    with pytest.raises(ValueError, match="sha256 hex digest"):
        GatewaySettings(api_key_sha256=["not-a-digest"])
    with pytest.raises(ValueError, match="wildcard"):
        GatewaySettings(api_key_sha256=[sha256_hex(KEY)], cors_origins=["*"])
    monkeypatch.setenv("RLHF_GATEWAY_API_KEY_SHA256", f"{sha256_hex('a')}, {sha256_hex('b')}")
    monkeypatch.setenv("RLHF_GATEWAY_CORS_ORIGINS", "https://app.example.com")
    settings = GatewaySettings()
    assert settings.api_key_sha256 == [sha256_hex("a"), sha256_hex("b")]
    assert settings.cors_origins == ["https://app.example.com"]
