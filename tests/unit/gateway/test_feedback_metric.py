"""`rlhf_gateway_feedback_total{rating}` counts feedback Kafka acknowledged, by thumb or rating;
a duplicate of an idempotency key and a refused event are not counted."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.auth import sha256_hex
from services.gateway.publisher import PublishUnavailable
from services.gateway.settings import GatewaySettings

KEY = "unit-test-key"


class StandInPublisher:
    def __init__(self):
        self.down = False

    async def publish(self, event) -> None:
        if self.down:
            raise PublishUnavailable("broker down")


@pytest.fixture()
def client() -> TestClient:
    app = create_app(GatewaySettings(api_key_sha256=[sha256_hex(KEY)], rate_limit_burst=1000))
    app.state.publisher = StandInPublisher()
    return TestClient(app)


def count(client: TestClient, rating: str) -> float:
    registry = client.app.state.metrics.registry
    return registry.get_sample_value("rlhf_gateway_feedback_total", {"rating": rating})


def test_feedback_is_counted_by_rating(client):
    assert {r: count(client, r) for r in ("up", "down", "1", "5")} == dict.fromkeys(
        ("up", "down", "1", "5"), 0.0
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    bodies = [
        {"response_id": "r1", "thumb": "up", "idempotency_key": "k1"},
        {"response_id": "r1", "thumb": "up", "idempotency_key": "k1"},  # duplicate
        {"response_id": "r2", "thumb": "down"},
        {"response_id": "r3", "rating": 5},
        {"response_id": "r4", "rating": 5},
        {"response_id": "r5", "rating": 9},  # 422
    ]
    codes = [client.post("/v1/feedback", json=b, headers=headers).status_code for b in bodies]
    assert codes == [202, 202, 202, 202, 202, 422]
    client.app.state.publisher.down = True
    refused = client.post("/v1/feedback", json={"response_id": "r6", "rating": 1}, headers=headers)
    assert refused.status_code == 503
    assert [count(client, r) for r in ("up", "down", "1", "5")] == [1.0, 1.0, 0.0, 2.0]
    text = client.get("/metrics").text
    assert 'rlhf_gateway_feedback_total{rating="5"} 2.0' in text
