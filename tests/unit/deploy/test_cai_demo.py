"""The CAI demo's RL stage turns the constitution judge's verdicts into reward-model pairs."""

from __future__ import annotations

import json

from deploy.local.cai_demo import ai_preference_rows
from services.common.training.data import DataKind, load_records


def label(p_a_better: float) -> dict:
    return {"prompt": "q", "answer_a": "A", "answer_b": "B", "p_a_better": p_a_better}


def test_the_preferred_answer_is_chosen_and_a_tie_is_left_out():
    rows = ai_preference_rows([label(0.9), label(0.2), label(0.5), label(0.5001)])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("A", "B"), ("B", "A"), ("A", "B")]
    assert {r["source"] for r in rows} == {"ai"} and {r["prompt"] for r in rows} == {"q"}


def test_the_rows_are_what_train_reward_reads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ai_preference_rows([label(0.8)])))
    (pair,) = load_records(path, DataKind.PREFERENCE)
    assert (pair.chosen, pair.rejected, pair.source) == ("A", "B", "ai")
