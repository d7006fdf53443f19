"""The refresh keeps who labelled each pair: PREFERENCE_SOURCE_AI records are `ai`, all others
`human`, with the record's cohort; the store keeps both (and opens a store written before them);
the weights are settings; an ensemble is refreshed with its own head count; the per-cohort
figures and agreements become gauges."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.common.preferences import pair_record
from services.common.training.data import PreferencePair
from services.genproto.rlhf.v1 import events_pb2
from services.refresh import worker as refresh
from services.refresh.metrics import report_cohorts
from services.refresh.settings import RefreshSettings
from services.refresh.store import CurrentVersion, PairStore

Source = events_pb2.PreferenceSource


def test_the_store_keeps_source_and_cohort(tmp_path: Path):
    store = PairStore(tmp_path)
    ai = PreferencePair("p1", "a", "b", source="ai", cohort="")
    expert = PreferencePair("p2", "c", "d", source="human", cohort="experts")
    store.add_pair("id-1", ai, held_out=False)
    store.add_pair("id-2", expert, held_out=True)
    store.commit()
    store.close()
    store = PairStore(tmp_path)
    assert [p for _, p in store.new_training_pairs()] == [ai]
    assert store.held_out_pairs(5) == [expert]
    assert store.pairs_by_seq([s for s, _ in store.new_training_pairs()]) == [ai]
    assert store.all_pairs() == [ai, expert]


def test_a_store_written_before_sources_opens_with_its_pairs_human(tmp_path: Path):
    db = sqlite3.connect(tmp_path / "refresh.sqlite")
    db.executescript(
        "CREATE TABLE pairs (seq INTEGER PRIMARY KEY AUTOINCREMENT, preference_id TEXT UNIQUE, "
        "prompt TEXT, chosen TEXT, rejected TEXT, held_out INTEGER, trained INTEGER DEFAULT 0);"
        "INSERT INTO pairs (preference_id, prompt, chosen, rejected, held_out) "
        "VALUES ('old', 'p', 'a', 'b', 0);"
    )
    db.commit()
    db.close()
    store = PairStore(tmp_path)
    assert store.all_pairs() == [PreferencePair("p", "a", "b", source="human", cohort="")]
    store.add_pair("new", PreferencePair("q", "c", "d", source="ai", cohort="k"), held_out=False)
    assert store.all_pairs()[1].source == "ai"


def _worker(tmp_path: Path, **settings) -> SimpleNamespace:
    return SimpleNamespace(
        store=PairStore(tmp_path),
        settings=SimpleNamespace(held_out_modulus=10, **settings),
        metrics=refresh.RefreshMetrics(CollectorRegistry()),
    )


@pytest.mark.parametrize(
    ("source", "stored"),
    [
        (Source.PREFERENCE_SOURCE_AI, "ai"),
        (Source.PREFERENCE_SOURCE_LIVE_FEEDBACK, "human"),
        (Source.PREFERENCE_SOURCE_ANNOTATION, "human"),
        (Source.PREFERENCE_SOURCE_FILE, "human"),
        (Source.PREFERENCE_SOURCE_UNSPECIFIED, "human"),
    ],
)
def test_records_are_stored_with_their_source_and_cohort(tmp_path: Path, source, stored):
    worker = _worker(tmp_path)
    record = pair_record("a prompt", "good", "bad", source, [], "id-1")
    record.cohort = "nurses"
    refresh.RefreshWorker._store_pair(worker, record, seen_by_base=False)
    assert worker.store.all_pairs() == [
        PreferencePair("a prompt", "good", "bad", source=stored, cohort="nurses")
    ]


def test_the_weights_are_settings_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_REFRESH_BASE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("RLHF_REFRESH_AI_WEIGHT", "0.25")
    monkeypatch.setenv("RLHF_REFRESH_HUMAN_WEIGHT", "2")
    settings = RefreshSettings()
    assert (settings.ai_weight, settings.human_weight) == (0.25, 2.0)
    with pytest.raises(ValidationError, match="human_weight and ai_weight are both 0"):
        RefreshSettings(ai_weight=0, human_weight=0)
    with pytest.raises(ValidationError, match="ai_weight"):
        RefreshSettings(ai_weight=-1)


def test_a_refresh_trains_with_the_current_versions_heads_and_the_weights(tmp_path, tiny_rm_dir):
    from tests.support.scoring_stacks import tiny_ensemble_reward_model

    three = tiny_ensemble_reward_model(tmp_path / "three", heads=3)
    worker = SimpleNamespace(
        settings=RefreshSettings(
            base_model_dir=tiny_rm_dir, versions_root=tmp_path / "v", ai_weight=0.5
        )
    )
    for folder, heads in ((tiny_rm_dir, 1), (three, 3)):
        config = refresh.RefreshWorker.training_config(worker, CurrentVersion(4, folder, {}, False))
        assert (config.ensemble_size, config.ai_weight, config.human_weight) == (heads, 0.5, 1.0)
        assert config.model == folder and config.output.name == "v00000005"


def test_cohort_figures_and_agreements_become_gauges_and_stale_cohorts_go(tmp_path):
    worker = _worker(tmp_path)
    cohorts = {
        "x": {"held_out_pairs": 4, "train_pairs": 6, "train_share": 0.75, "accuracy": 0.5},
        "y": {"held_out_pairs": 0, "train_pairs": 2, "train_share": 0.25, "accuracy": None},
    }
    agreement = {
        "inter_cohort": {"label_pairs": 0, "agreeing": 0, "share": None},
        "ai_human": {"label_pairs": 4, "agreeing": 3, "share": 0.75},
    }
    registry = CollectorRegistry()
    worker.metrics = refresh.RefreshMetrics(registry)
    report_cohorts(worker.metrics, cohorts, agreement)
    registry_value = registry.get_sample_value
    assert registry_value("rlhf_refresh_cohort_accuracy", {"cohort": "x"}) == 0.5
    assert registry_value("rlhf_refresh_cohort_accuracy", {"cohort": "y"}) is None  # no pairs
    assert registry_value("rlhf_refresh_cohort_pairs", {"cohort": "x"}) == 4
    assert registry_value("rlhf_refresh_cohort_pairs", {"cohort": "y"}) == 0
    assert registry_value("rlhf_refresh_cohort_train_share", {"cohort": "y"}) == 0.25
    assert registry_value("rlhf_refresh_ai_human_agreement") == 0.75
    assert math.isnan(registry_value("rlhf_refresh_inter_cohort_agreement"))  # nothing compared
    report_cohorts(worker.metrics, {"z": dict(cohorts["x"])}, agreement)
    assert registry_value("rlhf_refresh_cohort_pairs", {"cohort": "x"}) is None
    assert registry_value("rlhf_refresh_cohort_pairs", {"cohort": "z"}) == 4


def test_a_refresh_whose_pairs_all_weigh_nothing_is_skipped_once(tmp_path, tiny_rm_dir):
    """Only AI labels and ai_weight 0: no training (which would refuse), the pairs are marked
    trained so the next refresh waits for new data, nothing is published."""
    store = PairStore(tmp_path / "store")
    for i in range(3):
        store.add_pair(f"id-{i}", PreferencePair(f"p{i}", "a", "b", source="ai"), held_out=False)
    store.commit()
    settings = RefreshSettings(
        base_model_dir=tiny_rm_dir, versions_root=tmp_path / "v", ai_weight=0.0
    )
    worker = SimpleNamespace(
        settings=settings,
        store=store,
        base=CurrentVersion(1, tiny_rm_dir, {}, False),
        metrics=refresh.RefreshMetrics(CollectorRegistry()),
    )
    worker.training_config = lambda current: refresh.RefreshWorker.training_config(worker, current)
    worker._nothing_to_learn = lambda *a: refresh.RefreshWorker._nothing_to_learn(worker, *a)

    result = refresh.RefreshWorker.refresh(worker)

    assert not result.published and result.steps == 0 and "weight 0" in result.reason
    assert result.version == 1 and result.new_pairs == 3
    assert store.new_training_pairs() == []  # marked trained: not retried
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())
