"""Who labelled a pair: the optional `source`/`cohort` columns, the per-cohort report and the
agreement between cohorts and between the AI judge and people, each against a hand count on a
hand-made set."""

from __future__ import annotations

import pytest
import torch

from services.common.models import load_reward_model, load_tokenizer
from services.common.training.data import (
    DataError,
    PreferencePair,
    human_cohort,
    label_agreement,
    load_records,
    source_of,
)
from services.common.training.encoding import reward_batch
from services.common.training.reward import (
    COHORT_UNKNOWN,
    RewardConfig,
    agreement_report,
    cohort_report,
    run_train_reward,
)
from tests.unit.common.training.synthetic import reward_rows, write_jsonl


def test_source_and_cohort_columns_are_read_and_checked(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {"prompt": "p2", "chosen": "a", "rejected": "b", "source": "ai"},
        {"prompt": "p3", "responses": ["x", "y", "z"], "source": "human", "cohort": "experts"},
    ]
    pairs = load_records(write_jsonl(tmp_path / "d.jsonl", rows), "preference")
    assert [(p.source, p.cohort) for p in pairs] == [
        ("human", ""),
        ("ai", ""),
        *[("human", "experts")] * 3,  # a ranking's pairs share its labeller
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], source="robot")])
    with pytest.raises(DataError, match=r"bad.jsonl line 1: column 'source' must be one of"):
        load_records(bad, "preference")
    bad = write_jsonl(tmp_path / "bad2.jsonl", [dict(rows[0], cohort=7)])
    with pytest.raises(DataError, match=r"line 1: column 'cohort' must be a string, got int"):
        load_records(bad, "preference")


def _p(prompt, chosen, rejected, source="human", cohort=""):
    return PreferencePair(prompt, chosen, rejected, source=source, cohort=cohort)


# Comparison q1 {a, b}: A says a, B says a, B says b (again), C says b; AI says a.
# Comparison q2 {c, d}: A says c, C says c, AI says d. q3 {e, f}: only A. q4: an unknown cohort.
LABELS = [
    _p("q1", "a", "b", cohort="A"),
    _p("q1", "a", "b", cohort="B"),
    _p("q1", "b", "a", cohort="B"),
    _p("q1", "b", "a", cohort="C"),
    _p("q1", "a", "b", source="ai"),
    _p("q2", "c", "d", cohort="A"),
    _p("q2", "c", "d", cohort="C"),
    _p("q2", "d", "c", source="ai"),
    _p("q3", "e", "f", cohort="A"),
    _p("q4", "g", "h"),
    _p("q4", "h", "g", cohort="A"),
]


def test_inter_cohort_agreement_equals_a_hand_count():
    # q1 human labels A:a B:a B:b C:b; pairs of different cohorts: A-B(a) agree, A-B(b) no,
    # A-C no, B(a)-C no, B(b)-C agree -> 5 pairs, 2 agree (B-B is one cohort: not counted).
    # q2: A-C agree -> 1 of 1. q3: one label. q4: the unknown cohort is left out.
    agreement = label_agreement(LABELS, human_cohort)
    assert (agreement.label_pairs, agreement.agreeing) == (6, 3)
    assert agreement.share == 0.5


def test_judge_human_agreement_equals_a_hand_count():
    # q1: AI says a; humans a, a, b, b -> 4 pairs, 2 agree. q2: AI d; humans c, c -> 2, 0.
    agreement = label_agreement(LABELS, source_of)
    assert (agreement.label_pairs, agreement.agreeing) == (6, 2)
    assert agreement.share == pytest.approx(1 / 3)
    report = agreement_report(LABELS)
    assert report["ai_human"] == {"label_pairs": 6, "agreeing": 2, "share": pytest.approx(1 / 3)}
    assert report["inter_cohort"]["share"] == 0.5
    nothing = label_agreement([_p("q", "a", "b", cohort="A")], source_of)
    assert nothing.label_pairs == 0 and nothing.share is None


def test_the_cohort_report_equals_a_hand_count():
    train = [_p(f"t{i}", "a", "b", cohort=c) for i, c in enumerate("AAAABBC")] + [_p("t", "a", "b")]
    held_out = [
        _p("h1", "a", "b", cohort="A"),
        _p("h2", "a", "b", cohort="A"),
        _p("h3", "a", "b", cohort="A"),
        _p("h4", "a", "b", cohort="B"),
        _p("h5", "a", "b", cohort="D"),
        _p("h6", "a", "b"),
    ]
    correct = [True, False, True, False, True, True]
    report = cohort_report(train, held_out, correct)
    assert report == {
        "A": {"held_out_pairs": 3, "train_pairs": 4, "train_share": 4 / 8, "accuracy": 2 / 3},
        "B": {"held_out_pairs": 1, "train_pairs": 2, "train_share": 2 / 8, "accuracy": 0.0},
        "C": {"held_out_pairs": 0, "train_pairs": 1, "train_share": 1 / 8, "accuracy": None},
        "D": {"held_out_pairs": 1, "train_pairs": 0, "train_share": 0.0, "accuracy": 1.0},
        COHORT_UNKNOWN: {
            "held_out_pairs": 1,
            "train_pairs": 1,
            "train_share": 1 / 8,
            "accuracy": 1.0,
        },
    }


def test_train_reward_reports_each_cohorts_accuracy_of_the_saved_model(tmp_path, tiny_rm_dir):
    def labelled(rows, cohorts):
        return [dict(row, cohort=cohorts[i % len(cohorts)]) for i, row in enumerate(rows)]

    train = write_jsonl(tmp_path / "t.jsonl", labelled(reward_rows(20, seed=1), ["x", "y"]))
    held = write_jsonl(tmp_path / "e.jsonl", labelled(reward_rows(15, seed=2), ["x", "y", "z"]))
    output = tmp_path / "rm"
    summary = run_train_reward(
        RewardConfig(
            model=tiny_rm_dir,
            data=train,
            eval_data=held,
            output=output,
            epochs=2,
            batch_size=8,
            learning_rate=2e-3,
            max_length=48,
        )
    )
    model = load_reward_model(output, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(output)
    train_pairs, held_pairs = load_records(train, "preference"), load_records(held, "preference")
    with torch.no_grad():
        prompts = [p.prompt for p in held_pairs]
        chosen = model(**reward_batch(tokenizer, prompts, [p.chosen for p in held_pairs], 48))
        rejected = model(**reward_batch(tokenizer, prompts, [p.rejected for p in held_pairs], 48))
    right = (chosen.logits[:, 0] > rejected.logits[:, 0]).tolist()
    assert set(summary["cohorts"]) == {"x", "y", "z"}
    for cohort, figures in summary["cohorts"].items():
        mine = [r for p, r in zip(held_pairs, right) if p.cohort == cohort]
        trained = sum(p.cohort == cohort for p in train_pairs)
        assert figures["held_out_pairs"] == len(mine) > 0
        assert figures["train_pairs"] == trained and figures["train_share"] == pytest.approx(
            trained / len(train_pairs)
        )
        assert figures["accuracy"] == pytest.approx(sum(mine) / len(mine))
    assert summary["agreement"]["ai_human"]["label_pairs"] == 0  # no AI labels in these files
