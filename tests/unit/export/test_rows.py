"""`rlhf export`'s pure parts: TRL rows from records, the window's syntax, bad configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.preferences import Source, label_record, pair_record
from services.export.run import (
    ExportConfig,
    ExportError,
    check,
    parse_offsets,
    parse_time,
    to_row,
)
from services.genproto.rlhf.v1 import common_pb2, events_pb2


def test_a_pair_is_a_conversational_dpo_row():
    asked = common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[
                common_pb2.ChatMessage(role="system", content="Be brief."),
                common_pb2.ChatMessage(role="user", content="Hi"),
            ]
        )
    )
    record = pair_record("system: Be brief.\nuser: Hi", "Hello.", "Go away.", 1, [], "p-1", asked)
    kind, row = to_row(record)
    assert kind == "preferences"
    assert row["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert row["chosen"] == [{"role": "assistant", "content": "Hello."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Go away."}]
    assert (row["preference_id"], row["source"]) == ("p-1", "live_feedback")


def test_a_label_is_a_kto_row_and_a_text_prompt_is_one_user_turn():
    kind, row = to_row(label_record("2+2?", "5", False, Source.PREFERENCE_SOURCE_AI, [], "l-1"))
    assert kind == "labels"
    assert row["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert row["completion"] == [{"role": "assistant", "content": "5"}]
    assert row["label"] is False and row["source"] == "ai"


def test_a_record_written_before_conversations_uses_its_prompt_text():
    old = events_pb2.PreferenceRecord(
        preference_id="old",
        prompt="Q",
        pair=events_pb2.PairwisePreference(chosen="a", rejected="b"),
    )
    assert to_row(old)[1]["prompt"] == [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="neither a pair nor a label"):
        to_row(events_pb2.PreferenceRecord(preference_id="empty"))


def test_offsets_and_times_parse_or_name_the_field():
    assert parse_offsets("start_offsets", "5", [0, 1]) == {0: 5, 1: 5}
    assert parse_offsets("start_offsets", "1:7,0:2", [0, 1]) == {1: 7, 0: 2}
    assert parse_offsets("start_offsets", "", [0]) == {}
    for bad in ("x", "0:1:2", "3:1", "-1"):
        with pytest.raises(ExportError, match="start_offsets"):
            parse_offsets("start_offsets", bad, [0, 1])
    assert parse_time("since", "2026-12-01T00:00:00Z") == 1_796_083_200_000
    assert parse_time("since", "2026-12-01T01:00:00+01:00") == 1_796_083_200_000
    assert parse_time("since", "1796083200.5") == 1_796_083_200_500
    assert parse_time("since", "") is None
    for bad in ("yesterday", "2026-12-01T00:00:00"):
        with pytest.raises(ExportError, match="since"):
            parse_time("since", bad)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "csv"}, "format"),
        ({"since": "2026-12-01T00:00:00Z", "start_offsets": "0"}, "not both"),
        ({"sources": "users"}, "sources"),
    ],
)
def test_bad_configuration_is_refused_before_kafka_is_reached(fields, message):
    with pytest.raises(ExportError, match=message):
        check(ExportConfig(output=Path("x"), **fields))
