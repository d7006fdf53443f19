"""The short version of `make chaos`: each fault of bench/chaos.py injected once, with small
sizes, on the session's real broker and Triton server. A row passes when nothing acknowledged
was lost or duplicated and every promise the scenario checks held."""

from __future__ import annotations

import pytest

from bench.chaos_scenarios import ChaosEnv, Row
from bench.chaos_scenarios import trainer as trainer_faults
from bench.chaos_scenarios.broker import broker_outage
from bench.chaos_scenarios.poison import poison_records
from bench.chaos_scenarios.policy import bad_weights, replica_kill
from bench.chaos_scenarios.triton import triton_kill


@pytest.fixture()
def chaos_env(kafka_broker, kafka_settings, triton_server, tiny_lm_dir, tiny_rm_dir, tmp_path):
    return ChaosEnv(
        broker=kafka_broker,
        kafka=kafka_settings,
        triton=triton_server,
        lm_dir=tiny_lm_dir,
        rm_dir=tiny_rm_dir,
        work=tmp_path,
    )


def assert_clean(row: Row) -> None:
    assert row.injected >= 1, row
    assert row.failures == [], row
    assert (row.lost, row.duplicated) == (0, 0), row
    assert row.acknowledged == row.found > 0, row


def test_trainer_kill_9(chaos_env):
    assert_clean(trainer_faults.trainer_kill(chaos_env, kills=1))


def test_checkpoint_folder_full(chaos_env):
    assert_clean(trainer_faults.checkpoint_full(chaos_env, groups=8))


def test_broker_outage(chaos_env):
    assert_clean(broker_outage(chaos_env, outage_s=6.0))


def test_policy_replica_kill_9(chaos_env):
    # Includes "B's Triton lives through": the restarted replica attaches to the model its
    # Triton still serves instead of reloading it (bench/NOTES.md, "Chaos").
    assert_clean(replica_kill(chaos_env, kills=1))


def test_triton_kill_9(chaos_env):
    assert_clean(triton_kill(chaos_env, kills=1))


def test_bad_weights(chaos_env):
    row = bad_weights(chaos_env, rounds=1)
    assert row.injected == 5 and row.failures == [] and row.requests_failed == 0, row


def test_poison_record_on_every_consumed_topic(chaos_env):
    assert_clean(poison_records(chaos_env, per_topic=1))
