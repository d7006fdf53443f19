"""Rubric and constitution files, the judge prompt, and the order-combining formula."""

from __future__ import annotations

import pytest

from services.judge.rubric import (
    DEFAULT_CONSTITUTION,
    DEFAULT_RUBRIC,
    RubricError,
    combine,
    confidence,
    judge_messages,
    load_constitution,
    load_rubric,
)


def test_default_rubric_and_constitution_load_with_their_versions():
    rubric = load_rubric(DEFAULT_RUBRIC)
    assert rubric.version == "default-v1"
    assert "pick the better one" in rubric.text
    constitution = load_constitution(DEFAULT_CONSTITUTION)
    assert constitution.version == "constitution-v1"
    assert len(constitution.principles) == 12
    assert len({p.name for p in constitution.principles}) == 12
    for p in constitution.principles:
        assert p.critique and p.revision and p.rule


def test_a_constitution_is_a_rubric_of_its_rules():
    constitution = load_constitution(DEFAULT_CONSTITUTION)
    rubric = load_rubric(DEFAULT_CONSTITUTION)
    assert rubric == constitution.rubric()
    assert rubric.version == "constitution-v1"
    for p in constitution.principles:
        assert f"- {p.name}: {p.rule}" in rubric.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rubric: no version\n", "'version' must be a non-empty string"),
        ("version: v1\n", "'rubric' must be a non-empty string"),
        ("version: v1\nprinciples: []\n", "'principles' must be a non-empty list"),
        (
            "version: v1\nprinciples:\n  - {name: a, rule: r, critique: c}\n",
            "principles[0].revision must be a non-empty string",
        ),
        (
            (
                "version: v1\nprinciples:\n"
                "  - {name: a, rule: r, critique: c, revision: v}\n"
                "  - {name: a, rule: r, critique: c, revision: v}\n"
            ),
            "principles[1].name: 'a' appears twice",
        ),
        ("version: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "rubric.yaml"
    path.write_text(text)
    with pytest.raises(RubricError) as caught:
        load_rubric(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_is_a_rubric_error(tmp_path):
    with pytest.raises(RubricError, match="cannot read"):
        load_rubric(tmp_path / "absent.yaml")


def test_judge_prompt_shows_first_as_a_and_asks_for_a_letter():
    rubric = load_rubric(DEFAULT_RUBRIC)
    system, user = judge_messages(rubric, "2+2?", "four", "five")
    assert system == {"role": "system", "content": rubric.text}
    assert user["role"] == "user"
    content = user["content"]
    assert content.index("Question:\n2+2?") < content.index("Answer A:\nfour")
    assert content.index("Answer A:\nfour") < content.index("Answer B:\nfive")
    assert content.endswith("Reply with one letter: A or B.")
    swapped = judge_messages(rubric, "2+2?", "five", "four")[1]["content"]
    assert "Answer A:\nfive" in swapped and "Answer B:\nfour" in swapped


def test_combine_cancels_position_bias():
    # By hand: (0.9 + (1 - 0.3)) / 2 = 0.8.
    assert combine(0.9, 0.3) == pytest.approx(0.8)
    # A judge that always prefers the first-shown answer is a tie, whatever its strength.
    for q in (0.0, 0.2, 0.7, 1.0):
        assert combine(q, q) == pytest.approx(0.5)
    assert combine(1.0, 0.0) == 1.0 and combine(0.0, 1.0) == 0.0
    assert confidence(0.8) == pytest.approx(0.6)
    assert confidence(0.2) == pytest.approx(0.6)
    assert confidence(0.5) == 0.0
