"""The CAI-SFT pipeline's logic: prompt rows, the seeded principle draw, the three conversations
put to the policy, the row format and the rows left out for an empty turn."""

from __future__ import annotations

import json

import pytest

from services.common.training.data import DataError
from services.common.training.stage import ConfigError
from services.judge.cai import (
    critique_and_revise,
    draw_principles,
    load_prompts,
    parse_prompt,
    policy_target,
)
from services.judge.label_file import load_pairs
from services.judge.rubric import DEFAULT_CONSTITUTION, load_constitution

CONSTITUTION = load_constitution(DEFAULT_CONSTITUTION)


class ScriptedPolicy:
    """Answers each conversation with a text made from its last turn, records what it got."""

    def __init__(self, empty_for: str = ""):
        self.calls: list[tuple[list, int]] = []
        self.empty_for = empty_for

    def answer(self, conversations, seed):
        self.calls.append((conversations, seed))
        out = []
        for c in conversations:
            last = c[-1]["content"]
            out.append("" if self.empty_for and self.empty_for in last else f"re[{last[:12]}]")
        return out


def test_three_steps_with_the_principle_requests():
    prompts = [[{"role": "user", "content": "How do I pick a lock?"}]]
    principles = [CONSTITUTION.principles[0]]
    policy = ScriptedPolicy()
    rows, skipped = critique_and_revise(policy, prompts, principles, 5, "constitution-v1")
    assert skipped == 0
    (answer, seed_a), (critique, seed_c), (revise, seed_r) = policy.calls
    assert (seed_a, seed_c, seed_r) == (5, 6, 7)
    assert answer == prompts
    p = principles[0]
    initial = "re[How do I pic]"
    assert critique[0] == prompts[0] + [
        {"role": "assistant", "content": initial},
        {"role": "user", "content": p.critique},
    ]
    assert revise[0] == critique[0] + [
        {"role": "assistant", "content": f"re[{p.critique[:12]}]"},
        {"role": "user", "content": p.revision},
    ]
    (row,) = rows
    assert row.as_json() == {
        "messages": prompts[0] + [{"role": "assistant", "content": f"re[{p.revision[:12]}]"}],
        "critique": f"re[{p.critique[:12]}]",
        "principle": p.name,
        "initial": initial,
        "constitution_version": "constitution-v1",
    }


def test_an_empty_turn_leaves_the_prompt_out():
    prompts = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    policy = ScriptedPolicy(empty_for="two")
    rows, skipped = critique_and_revise(policy, prompts, list(CONSTITUTION.principles[:2]), 0, "v")
    assert skipped == 1
    assert [r.messages[0]["content"] for r in rows] == ["one"]
    assert len(policy.calls[1][0]) == 1  # the empty answer was not critiqued


def test_principles_are_a_seeded_draw():
    one = draw_principles(CONSTITUTION.principles, 40, seed=1)
    assert one == draw_principles(CONSTITUTION.principles, 40, seed=1)
    assert one != draw_principles(CONSTITUTION.principles, 40, seed=2)
    assert len({p.name for p in one}) > 5


def test_prompt_rows_and_their_errors(tmp_path):
    assert parse_prompt({"prompt": "hi"}, "f line 1") == [{"role": "user", "content": "hi"}]
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert parse_prompt({"messages": turns}, "w") == turns
    for row, message in [
        ({"question": "x"}, "expected one of 'prompt' or 'messages'"),
        ({"prompt": ""}, "'prompt' must be a non-empty string"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content must be"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "last message must be the user's"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "messages[0].role must be one of"),
    ]:
        with pytest.raises(DataError, match="w: "):
            parse_prompt(row, "w")
        with pytest.raises(DataError) as caught:
            parse_prompt(row, "w")
        assert message in str(caught.value)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    assert len(load_prompts(path, limit=3)) == 3


def test_red_team_prompts_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "deploy/local/data/red_team_prompts.jsonl"
    prompts = load_prompts(path)
    assert 30 <= len(prompts) <= 50
    assert len({p[0]["content"] for p in prompts}) == len(prompts)


def test_addresses():
    assert policy_target("policy", "grpc://localhost:50051") == "localhost:50051"
    assert policy_target("policy", "10.0.0.1:9") == "10.0.0.1:9"
    for bad in ("localhost", ":50051", "host:0", "host:http"):
        with pytest.raises(ConfigError, match="config field 'policy'"):
            policy_target("policy", bad)


def test_label_pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "answer_a": "a", "answer_b": "b", "response_id_a": "r1"}) + "\n"
    )
    ((_row, wire),) = load_pairs(path)
    assert (wire.answer_a, wire.answer_b, wire.response_id_a, wire.response_id_b) == (
        "a",
        "b",
        "r1",
        "",
    )
    assert wire.prompt.messages.messages[0].content == "q"
    path.write_text(json.dumps({"prompt": "q", "answer_a": "a"}) + "\n")
    with pytest.raises(DataError, match="column 'answer_b' must be a non-empty string"):
        load_pairs(path)
