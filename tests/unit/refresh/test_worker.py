"""The refresh's decisions and bookkeeping: publish only if not worse, a stable held-out split,
replay mixing, de-duplication and a store that survives a restart."""

from __future__ import annotations

import hashlib
import random
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from services.common.training.data import PreferencePair
from services.genproto.rlhf.v1 import reward_pb2
from services.refresh import worker as refresh
from services.refresh.worker import (
    CurrentVersion,
    PairStore,
    drop_p_value,
    is_held_out,
    publish_decision,
    replay_sample,
)


@pytest.mark.parametrize(
    ("before", "after", "tolerance", "publish"),
    [
        (0.50, 0.95, 0.0, True),
        (0.80, 0.80, 0.0, True),  # equal is "did not drop"
        (0.80, 0.79, 0.0, False),
        (0.80, 0.79, 0.02, True),
        (0.80, 0.77, 0.02, False),
        (1.00, 0.9375, 0.0, False),
    ],
)
def test_publish_only_when_held_out_accuracy_did_not_drop(before, after, tolerance, publish):
    decision = publish_decision(before, after, tolerance)
    assert decision.publish is publish
    assert f"{before:.4f} -> {after:.4f}" in decision.reason


def test_drop_p_value_is_the_one_sided_exact_mcnemar_test():
    # Reference values: P(X >= lost) for X ~ Binomial(lost + gained, 1/2), summed by hand.
    assert drop_p_value(0, 0) == 1.0
    assert drop_p_value(4, 0) == 1 / 16
    assert drop_p_value(5, 0) == 1 / 32
    assert drop_p_value(6, 2) == (28 + 8 + 1) / 256
    assert drop_p_value(2, 6) == 1 - (1 + 8) / 256
    assert drop_p_value(3, 3) == (20 + 15 + 6 + 1) / 64
    # Large held-out sets stay exact (big integers) and in [0, 1].
    assert drop_p_value(1100, 900) < 1e-5
    assert 0.99 < drop_p_value(900, 1100) <= 1.0


@pytest.mark.parametrize(
    ("lost", "gained", "significance", "publish"),
    [
        (6, 2, 0.0, False),  # no test: the tolerance alone decides, as before
        (6, 2, 0.05, True),  # p = 0.145: a drop of 4 pairs that could be chance
        (4, 0, 0.05, True),  # p = 0.0625
        (5, 0, 0.05, False),  # p = 0.031: significant
        (30, 10, 0.05, False),
    ],
)
def test_a_drop_beyond_tolerance_publishes_only_when_it_is_not_significant(
    lost, gained, significance, publish
):
    decision = publish_decision(
        0.80, 0.77, 0.02, lost=lost, gained=gained, significance=significance
    )
    assert decision.publish is publish
    assert "0.8000 -> 0.7700" in decision.reason
    if significance:
        assert f"p = {drop_p_value(lost, gained):.3f}" in decision.reason
    # Within the tolerance the test is not consulted: a significant drop of 0.01 still publishes.
    assert publish_decision(0.80, 0.79, 0.02, lost=50, gained=0, significance=0.05).publish


def test_held_out_split_is_the_prompt_hash_modulo_and_stable():
    prompts = [f"prompt number {i}" for i in range(3000)]
    reference = [int(hashlib.sha256(p.encode()).hexdigest()[:32], 16) % 10 == 0 for p in prompts]
    assert [is_held_out(p, 10) for p in prompts] == reference
    assert [is_held_out(p, 10) for p in reversed(prompts)] == reference[::-1]  # order-free
    share = sum(reference) / len(reference)
    assert 0.08 < share < 0.12
    # modulus 2 holds out about half
    assert 0.45 < sum(is_held_out(p, 2) for p in prompts) / len(prompts) < 0.55


def test_replay_sample_draws_ratio_times_new_without_replacement():
    older = list(range(100))
    picked = replay_sample(older, new_count=30, ratio=1.5, rng=random.Random(3))
    assert len(picked) == 45 and len(set(picked)) == 45 and set(picked) <= set(older)
    assert picked == replay_sample(older, 30, 1.5, random.Random(3))  # seeded: same draw
    assert (
        sorted(replay_sample(older[:10], 30, 1.0, random.Random(0))) == older[:10]
    )  # all when fewer
    assert replay_sample(older, 30, 0.0, random.Random(0)) == []
    assert replay_sample([], 30, 1.0, random.Random(0)) == []


def _pair(i: int) -> PreferencePair:
    return PreferencePair(f"prompt {i}", f"good answer {i}", f"bad answer {i}")


def test_store_dedupes_by_preference_id_and_survives_reopening(tmp_path: Path):
    store = PairStore(tmp_path)
    for i in range(6):
        assert store.mark_seen(f"id-{i}")
        store.add_pair(f"id-{i}", _pair(i), held_out=(i == 5))
    assert not store.mark_seen("id-2")  # the same record again
    store.set_offset("rlhf.preferences.v1", 1, 42)
    store.commit()
    store.mark_seen("id-99")
    store.add_pair("id-99", _pair(99), held_out=False)
    store.rollback()  # a batch that failed leaves nothing behind
    store.close()

    store = PairStore(tmp_path)
    assert not store.mark_seen("id-0") and store.mark_seen("id-99")
    assert store.count(held_out=False) == 5 and store.count(held_out=True) == 1
    assert store.offsets() == {("rlhf.preferences.v1", 1): 42}
    new = store.new_training_pairs()
    assert [p for _, p in new] == [_pair(i) for i in range(5)]
    assert store.held_out_pairs(10) == [_pair(5)]

    store.mark_trained(new[2][0])  # the first three were used by a refresh
    assert [p for _, p in store.new_training_pairs()] == [_pair(3), _pair(4)]
    assert store.pairs_by_seq(store.trained_seqs()) == [_pair(0), _pair(1), _pair(2)]
    assert store.count(held_out=False, trained=False) == 2


def test_current_version_defaults_to_the_base_then_persists(tmp_path: Path):
    base = CurrentVersion(1, tmp_path / "base", {"model.safetensors": "a" * 64}, False)
    store = PairStore(tmp_path)
    assert store.current(base) == base
    published = CurrentVersion(2, tmp_path / "v00000002", {"model.safetensors": "b" * 64}, True)
    store.set_current(published)
    store.commit()
    store.close()
    assert PairStore(tmp_path).current(base) == published


def test_an_unreachable_replica_is_tried_reload_attempts_times_with_pauses_only_between(
    monkeypatch,
):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    pauses: list[float] = []
    monkeypatch.setattr(refresh.time, "sleep", pauses.append)
    worker = SimpleNamespace(
        settings=SimpleNamespace(reload_attempts=3, reload_timeout_s=5.0),
        metrics=refresh.RefreshMetrics(CollectorRegistry()),
    )
    answer = refresh.RefreshWorker._reload_one(
        worker, address, reward_pb2.ReloadModelRequest(reward_model_version=2)
    )
    assert answer is None
    assert pauses == [1.0, 2.0]  # after the 1st and 2nd tries, not after the last
    assert worker.metrics.reloads.labels("unreachable")._value.get() == 1
