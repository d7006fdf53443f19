"""Feedback, preferences and rankings posted over HTTP to the real gateway are in the real
Kafka when the 202 comes back; the same idempotency key is stored once; auth and rate limits
hold over the wire."""

from __future__ import annotations

import uuid

import httpx

from services.common import topics
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import read_topic, running_gateway


def test_thumb_is_in_kafka_when_acknowledged_and_stored_once_per_key(gateway, kafka_settings):
    rid = f"resp-{uuid.uuid4().hex}"
    body = {
        "response_id": rid,
        "thumb": "up",
        "comment": "clear",
        "categories": ["helpful"],
        "cohort": "de-DE",
        "idempotency_key": f"idem-{rid}",
    }
    first = httpx.post(f"{gateway.url}/v1/feedback", json=body, headers=gateway.headers, timeout=10)
    assert first.status_code == 202, first.text
    again = httpx.post(f"{gateway.url}/v1/feedback", json=body, headers=gateway.headers, timeout=10)
    assert again.status_code == 202
    assert again.json() == {**first.json(), "duplicate": True, "records": 0}
    rating = httpx.post(
        f"{gateway.url}/v1/feedback",
        json={"response_id": rid, "rating": 2},
        headers=gateway.headers,
        timeout=10,
    )
    assert rating.status_code == 202

    mine = read_topic(
        kafka_settings,
        topics.FEEDBACK,
        events_pb2.FeedbackEvent,
        lambda found: len([e for e in found if e.response_id == rid]) >= 2,
    )
    mine = [e for e in mine if e.response_id == rid]
    assert sorted((e.feedback_id, e.thumb, e.rating) for e in mine) == sorted(
        [
            (first.json()["id"], events_pb2.THUMB_UP, 0),
            (rating.json()["id"], events_pb2.THUMB_UNSPECIFIED, 2),
        ]
    )
    up = next(e for e in mine if e.thumb == events_pb2.THUMB_UP)
    assert (up.comment, list(up.categories), up.idempotency_key, up.cohort) == (
        "clear",
        ["helpful"],
        f"idem-{rid}",
        "de-DE",
    )
    assert next(e for e in mine if e.rating == 2).cohort == ""


def test_ranking_of_four_is_six_pairs_in_kafka(gateway, kafka_settings):
    prompt = f"Name a prime ({uuid.uuid4().hex})"
    ranked = ["7", "9 (no: 3x3)", "twelve", "banana"]
    response = httpx.post(
        f"{gateway.url}/v1/rankings",
        json={"prompt": prompt, "responses": ranked, "cohort": "vendor-7"},
        headers=gateway.headers,
        timeout=10,
    )
    assert response.status_code == 202 and response.json()["records"] == 6
    pref = httpx.post(
        f"{gateway.url}/v1/preferences",
        json={"prompt": prompt, "chosen": "2", "rejected": "4"},
        headers=gateway.headers,
    )
    assert pref.status_code == 202 and pref.json()["records"] == 1

    records = read_topic(
        kafka_settings,
        topics.PREFERENCES,
        events_pb2.PreferenceRecord,
        lambda found: len([r for r in found if r.prompt == prompt]) >= 7,
    )
    mine = [r for r in records if r.prompt == prompt]
    ranking_pairs = {
        (r.pair.chosen, r.pair.rejected)
        for r in mine
        if list(r.derived_from) == [response.json()["id"]]
    }
    assert ranking_pairs == {(ranked[i], ranked[j]) for i in range(4) for j in range(i + 1, 4)}
    assert ("2", "4") in {(r.pair.chosen, r.pair.rejected) for r in mine}
    assert len(mine) == 7
    assert sorted(r.cohort for r in mine) == [""] + ["vendor-7"] * 6


def test_auth_over_http(kafka_settings, run_dir):
    with running_gateway(
        kafka_settings, run_dir / "gateway", rate_limit_burst=3, rate_limit_per_s=0.01
    ) as gw:
        body = {"response_id": "r-auth", "thumb": "up"}
        url = f"{gw.url}/v1/feedback"
        assert httpx.post(url, json=body).status_code == 401
        assert (
            httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        codes = [httpx.post(url, json=body, headers=gw.headers).status_code for _ in range(4)]
        assert codes == [202, 202, 202, 429]
        limited = httpx.post(url, json=body, headers=gw.headers)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'rlhf_gateway_events_accepted_total{kind="feedback"} 3.0' in metrics
    # Neither the key nor a wrong one a caller sent is ever logged.
    log = gw.log_file.read_text()
    assert log.strip(), "the gateway logged nothing: the check below would prove nothing"
    assert gw.api_key not in log and "nope" not in log


def test_health_readiness_and_bad_input(gateway):
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    # Kafka is up; no policy listens on this gateway's policy address.
    assert ready.status_code == 503 and ready.json() == {"kafka": True, "policy": False}
    bad = httpx.post(
        f"{gateway.url}/v1/feedback",
        json={"response_id": "r", "rating": 9},
        headers=gateway.headers,
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "rating"]
