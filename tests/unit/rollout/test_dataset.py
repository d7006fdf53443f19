"""Prompt files: JSONL and Parquet, `prompt` or `messages` columns, clear errors otherwise."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.rollout.dataset import load_prompts


def test_jsonl_with_text_and_chat_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "What is 2+2?"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(path)
    assert prompts[0].text == "What is 2+2?"
    assert [(m.role, m.content) for m in prompts[1].messages.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]


def test_parquet_prompt_and_messages_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "other": [1, 2, 3]}), path)
    assert [p.text for p in load_prompts(path)] == ["a", "b", "c"]
    chat = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "x"}]]}), chat)
    assert load_prompts(chat)[0].messages.messages[0].content == "x"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "no prompt column"}', "needs a `prompt` or a `messages` column"),
        ('{"prompt": "  "}', "non-empty string"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "needs a role"),
        ('{"messages": []}', "non-empty list"),
        ("not json", "not JSON"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_prompts(path)
    assert "bad.jsonl:2" in str(err.value)


def test_unknown_file_type_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="unsupported"):
        load_prompts(tmp_path / "p.csv")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["a"]}), parquet)
    with pytest.raises(ValueError, match="`prompt` or a `messages`"):
        load_prompts(parquet)
