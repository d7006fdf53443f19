"""The annotator: loading `module:function`, and rankings, thumbs and verdicts that all follow
from one score; the shipped rules scored by hand on answers written for the test."""

from __future__ import annotations

import pytest

from services.common import annotator_rules as rules
from services.common.annotator import DEFAULT_THUMBS_UP_AT, AnnotatorError, load_annotator

Q = "Why is the sky blue during the day?"
GOOD = (
    "Sunlight scatters off the air's molecules, and blue light scatters the most because its "
    "waves are short, so the whole sky looks blue during the day."
)  # 26 words, ends a sentence, uses "blue"


def longest(prompt: str, answer: str) -> float:
    return float(len(answer))


def no_number(prompt: str, answer: str):
    return "good"


def test_the_default_rule_scores_a_good_answer_as_computed_by_hand():
    assert len(rules.words(GOOD)) == 26
    assert rules.content_words(Q) == {"blue"}  # under 4 letters ("sky", "day") or a stop word
    assert rules.helpful_concise(Q, GOOD) == pytest.approx(0.35 + 0.25 + 0.25 + 0.15)
    cut = GOOD.rsplit(" ", 4)[0]  # truncated mid-sentence: no credit for ending it
    assert rules.helpful_concise(Q, cut) == pytest.approx(0.35 + 0.25 + 0.15)
    rambling = " ".join([GOOD] * 4)  # 104 words; 102 trigrams, 24 + 2 across a boundary distinct
    assert rules.window(104, 10, 40, 100) == 0.0
    assert rules.helpful_concise(Q, rambling) == pytest.approx(
        0.25 + 0.25 + 0.15 * rules.fresh(rambling)
    )
    assert rules.fresh(rambling) == pytest.approx(26 / 102)


def test_window_parts():
    assert rules.window(5, 10, 40, 100) == 0.5
    assert rules.window(25, 10, 40, 100) == 1.0
    assert rules.window(70, 10, 40, 100) == pytest.approx(0.5)
    assert rules.complete('He said "yes."') == 1.0 and rules.complete("and then") == 0.0
    assert rules.topical("", "anything") == 1.0


def test_other_rules_judge_other_tastes():
    listed = "Two reasons:\n- short waves scatter more\n- the day sky is lit by sunlight."
    assert rules.list_items(listed) == 2
    assert rules.structured(Q, listed) > rules.structured(Q, GOOD)
    polite = "Good question! " + GOOD + " Hope this helps."
    assert rules.polite(Q, polite) == pytest.approx(1.0)
    assert rules.polite(Q, "Obviously, " + GOOD) == pytest.approx(0.2)
    assert rules.on_topic(Q, GOOD) == pytest.approx(1.0)
    assert rules.detailed(Q, GOOD) < rules.detailed(
        Q, GOOD + " " + GOOD.replace("Sunlight", "Light")
    )


def test_ranking_thumbs_and_verdicts_follow_from_the_score():
    judge = load_annotator("services.common.annotator_rules:helpful_concise")
    assert judge.thumbs_up_at == 0.8
    cut = GOOD.rsplit(" ", 4)[0]
    answers = [cut, GOOD, "No."]
    assert judge.rank(Q, answers) == [1, 0, 2]
    assert (judge.thumb(Q, GOOD), judge.thumb(Q, cut)) == ("up", "down")
    assert judge.prefer(Q, GOOD, cut) == 1.0 and judge.prefer(Q, cut, GOOD) == 0.0
    assert judge.prefer(Q, GOOD, GOOD) == 0.5


def test_a_teams_own_function_plugs_in_by_name():
    judge = load_annotator("tests.unit.common.test_annotator:longest")
    assert judge.thumbs_up_at == DEFAULT_THUMBS_UP_AT
    assert judge.rank("q", ["a", "ccc", "bb"]) == [1, 2, 0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected module:function"),
        ("no_such_module_x:score", "cannot import"),
        ("services.common.annotator_rules:nope", "has no function nope"),
        ("services.common.annotator_rules:words", "must take (prompt, answer)"),
    ],
)
def test_bad_names_are_refused_with_the_reason(spec, message):
    with pytest.raises(AnnotatorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_annotator(spec)


def test_a_score_that_is_not_a_number_is_an_error():
    judge = load_annotator("tests.unit.common.test_annotator:no_number")
    with pytest.raises(AnnotatorError, match="not a number"):
        judge.score("q", "a")
