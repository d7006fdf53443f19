"""The refresh of a reward-model ensemble from records of several labellers, on the real broker
and the real reward service (Triton): human pairs of cohorts `a`/`b`, second opinions of cohort
`c` and AI-judge labels (PREFERENCE_SOURCE_AI) of some of the same comparisons go to a private
preferences topic. The refresh trains the 3-head base into a 3-head version 2, which the reward
service takes and serves as an ensemble; the version's summary and the gauges carry per-cohort
counts and the judge-human and inter-cohort agreement equal to hand counts, and per-cohort
accuracy as the served model ranks the held-out pairs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.common.preferences import derived_id, pair_record
from services.common.training.stage import SUMMARY_FILE
from services.genproto.rlhf.v1 import common_pb2, events_pb2, reward_pb2, reward_pb2_grpc
from services.refresh.settings import RefreshSettings
from services.refresh.worker import RefreshWorker
from tests.integration.refresh.test_refresh import (
    MAX_LENGTH,
    _held_out,
    _pairs,
    _private_topic,
    _produce,
)
from tests.support.scoring_stacks import reward_stack, tiny_ensemble_reward_model

Source = events_pb2.PreferenceSource
HEADS = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_ensemble_reward_model(tmp_path_factory.mktemp("ensemble-base") / "v1", HEADS)


@pytest.fixture(scope="module")
def reward(triton_server, base, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    with reward_stack(triton_server, base, max_length=MAX_LENGTH, reload_root=root) as stack:
        yield stack


def _record(prompt, chosen, rejected, source, cohort, tag) -> events_pb2.PreferenceRecord:
    record = pair_record(prompt, chosen, rejected, source, [], derived_id(tag, prompt, chosen))
    record.cohort = cohort
    return record


def labelled_records():
    """(records, the pairs as (prompt, chosen, rejected, source, cohort)).

    Pairs 0-19 get an AI label too: 15 agree with the person, 5 swap the winner. Pairs 20-29
    get a second human label from cohort `c`: 6 agree, 4 swap."""
    rule = _pairs(160, seed=11)
    labels = [(p, c, r, "human", "ab"[i % 2]) for i, (p, c, r) in enumerate(rule)]
    labels += [
        (p, *((c, r) if i < 15 else (r, c)), "ai", "") for i, (p, c, r) in enumerate(rule[:20])
    ]
    labels += [
        (p, *((c, r) if i < 6 else (r, c)), "human", "c") for i, (p, c, r) in enumerate(rule[20:30])
    ]
    sources = {"human": Source.PREFERENCE_SOURCE_ANNOTATION, "ai": Source.PREFERENCE_SOURCE_AI}
    records = [
        _record(p, c, r, sources[s], cohort, f"{s}-{cohort}") for p, c, r, s, cohort in labels
    ]
    return records, labels


def test_an_ensemble_refresh_reports_cohorts_and_agreement_and_is_served(
    kafka_settings, reward, base, tmp_path: Path
):
    topic = _private_topic(kafka_settings)
    records, labels = labelled_records()
    _produce(kafka_settings, topic, records)
    settings = RefreshSettings(
        kafka=kafka_settings, topic=topic, group_id=f"refresh-test-{uuid.uuid4().hex[:8]}",
        state_dir=tmp_path / "state", versions_root=tmp_path / "versions", base_model_dir=base,
        reward_address=reward.address, refresh_every=10_000, min_held_out=1, epochs=3,
        batch_size=16, learning_rate=2e-3, max_length=MAX_LENGTH, device="cpu", torch_threads=2,
        poll_timeout_ms=300, metrics_port=0, ai_weight=0.5,
    )  # fmt: skip
    registry = CollectorRegistry()
    worker = RefreshWorker(settings, registry)
    try:
        for _ in range(40):  # every record stored before the refresh, so the counts are exact
            worker.consume()
            if worker.store.count(held_out=False) + worker.store.count(held_out=True) == len(
                labels
            ):
                break
        assert len(worker.store.all_pairs()) == len(labels)
        assert sum(p.source == "ai" for p in worker.store.all_pairs()) == 20
        result = worker.refresh()
    finally:
        worker.close()
    print(f"ensemble refresh: {result}")
    assert result.published and result.version == 2 and result.reload_accepted is True

    # The version's summary: 3 heads, the weights, per-cohort counts by hand, agreements.
    summary = json.loads((tmp_path / "versions" / "v00000002" / SUMMARY_FILE).read_text())
    assert summary["ensemble_size"] == HEADS and summary["weights"] == {"human": 1.0, "ai": 0.5}
    train = [x for x in labels if not _held_out(x[0])]
    held_out = [x for x in labels if _held_out(x[0])]
    name = {"a": "a", "b": "b", "c": "c", "": "unknown"}
    for cohort, figures in summary["cohorts"].items():
        assert figures["held_out_pairs"] == sum(name[x[4]] == cohort for x in held_out)
        assert figures["train_pairs"] == sum(name[x[4]] == cohort for x in train)
        assert figures["train_share"] == pytest.approx(figures["train_pairs"] / len(train))
    assert set(summary["cohorts"]) == {"a", "b", "c", "unknown"}
    assert summary["agreement"]["ai_human"] == {"label_pairs": 20, "agreeing": 15, "share": 0.75}
    # Cohort c's 10 second opinions meet one a/b label each: 6 agree.
    assert summary["agreement"]["inter_cohort"] == {
        "label_pairs": 10,
        "agreeing": 6,
        "share": 0.6,
    }

    value = registry.get_sample_value
    assert value("rlhf_refresh_ai_human_agreement") == 0.75
    assert value("rlhf_refresh_inter_cohort_agreement") == pytest.approx(0.6)
    for cohort, figures in summary["cohorts"].items():
        assert value("rlhf_refresh_cohort_pairs", {"cohort": cohort}) == figures["held_out_pairs"]
        assert value("rlhf_refresh_cohort_accuracy", {"cohort": cohort}) == figures["accuracy"]

    # The reward service serves version 2 as a 3-head ensemble, and ranks each cohort's held-out
    # pairs as the refresh measured it (to one pair: float noise at a tie).
    texts = [(p, c) for p, c, *_ in held_out] + [(p, r) for p, _, r, *_ in held_out]
    with grpc.insecure_channel(reward.address) as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).Score(
            reward_pb2.ScoreRequest(
                pairs=[
                    reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text=p), response=t)
                    for p, t in texts
                ]
            ),
            timeout=60,
        )
    assert reply.reward_model_version == 2 and reply.ensemble_size == HEADS
    scores = list(reply.scores)
    right = [c > r for c, r in zip(scores[: len(held_out)], scores[len(held_out) :])]
    for cohort, figures in summary["cohorts"].items():
        mine = [ok for x, ok in zip(held_out, right) if name[x[4]] == cohort]
        if mine:
            assert abs(sum(mine) / len(mine) - figures["accuracy"]) <= 1 / len(mine) + 1e-9
