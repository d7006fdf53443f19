"""API keys (hashed, constant-time) and per-key token buckets, unit and over HTTP."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.auth import ApiKeyVerifier, TokenBucket, sha256_hex
from services.gateway.settings import GatewaySettings

BAD_BODY = {"response_id": "r1"}  # 422 proves the request got past auth and the rate limit


def test_verifier_knows_keys_only_by_digest():
    verifier = ApiKeyVerifier([sha256_hex("alpha"), sha256_hex("beta")])
    assert verifier.verify("alpha").key_id == sha256_hex("alpha")[:12]
    assert verifier.verify("beta").key_id == sha256_hex("beta")[:12]
    assert verifier.verify("gamma") is None
    assert verifier.verify(sha256_hex("alpha")) is None  # the digest itself is not a key


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take("k", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("k", now=10.0) == 0.5  # one token needs 1/rate seconds
    assert bucket.take("other", now=10.0) == 0.0  # buckets are per key
    assert bucket.take("k", now=10.5) == 0.0
    assert bucket.take("k", now=10.5) == 0.5


def test_http_no_key_wrong_key_and_rate_limit():
    settings = GatewaySettings(
        api_key_sha256=[sha256_hex("good")], rate_limit_per_s=0.01, rate_limit_burst=2
    )
    client = TestClient(create_app(settings))
    assert client.post("/v1/feedback", json=BAD_BODY).status_code == 401
    wrong = client.post("/v1/feedback", json=BAD_BODY, headers={"Authorization": "Bearer bad"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    basic = client.post("/v1/feedback", json=BAD_BODY, headers={"Authorization": "Basic good"})
    assert basic.status_code == 401
    good = {"Authorization": "Bearer good"}
    assert [
        client.post("/v1/feedback", json=BAD_BODY, headers=good).status_code for _ in range(2)
    ] == [422, 422]
    limited = client.post("/v1/feedback", json=BAD_BODY, headers=good)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    metrics = client.get("/metrics").text
    assert "rlhf_gateway_rate_limited_total 1.0" in metrics
    assert 'rlhf_gateway_requests_total{code="429",route="/v1/feedback"} 1.0' in metrics
