"""A verdict as an AI PreferenceRecord: chosen is the preferred answer, ties give no record, the
AiLabel carries the judge, the rubric version, P(chosen better) and the confidence."""

from __future__ import annotations

import pytest

from services.genproto.rlhf.v1 import common_pb2, events_pb2
from services.judge.judges import Pair, Verdict
from services.judge.labels import ai_record

PAIR = Pair("Capital of France?", "Paris.", "Lyon.")
ASKED = common_pb2.Prompt(
    messages=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="user", content="Capital of France?")]
    )
)


def verdict(p: float) -> Verdict:
    return Verdict(p, abs(2 * p - 1), p, 1 - p)


def test_a_preferred_a_is_chosen():
    record = ai_record(ASKED, PAIR, verdict(0.8), "smollm2", "constitution-v1", ["r1", "r2"])
    assert record.source == events_pb2.PREFERENCE_SOURCE_AI
    assert (record.prompt, record.pair.chosen, record.pair.rejected) == (
        "Capital of France?",
        "Paris.",
        "Lyon.",
    )
    assert record.conversation == ASKED
    assert list(record.derived_from) == ["r1", "r2"]
    assert record.ai.judge_model == "smollm2"
    assert record.ai.rubric_version == "constitution-v1"
    assert record.ai.p_chosen_better == pytest.approx(0.8)
    assert record.ai.confidence == pytest.approx(0.6)


def test_b_preferred_b_is_chosen_with_its_probability():
    record = ai_record(None, PAIR, verdict(0.1), "j", "v1", ["", "r2"])
    assert (record.pair.chosen, record.pair.rejected) == ("Lyon.", "Paris.")
    assert record.ai.p_chosen_better == pytest.approx(0.9)
    assert list(record.derived_from) == ["r2"]  # unknown ids are left out
    assert record.conversation.text == "Capital of France?"


def test_ties_and_unsure_verdicts_give_no_record():
    assert ai_record(None, PAIR, verdict(0.5), "j", "v1") is None
    assert ai_record(None, PAIR, verdict(0.6), "j", "v1", min_confidence=0.3) is None
    assert ai_record(None, PAIR, verdict(0.7), "j", "v1", min_confidence=0.3) is not None


def test_ids_are_stable_and_name_the_judge_and_rubric():
    one = ai_record(None, PAIR, verdict(0.8), "j", "v1").preference_id
    assert one == ai_record(None, PAIR, verdict(0.9), "j", "v1").preference_id  # a retry
    assert one != ai_record(None, PAIR, verdict(0.8), "j", "v2").preference_id
    assert one != ai_record(None, PAIR, verdict(0.8), "k", "v1").preference_id
    assert one.startswith("ai-")
