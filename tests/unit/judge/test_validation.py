"""Compare requests are checked field by field before anything is judged; the settings' modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.rpc import FieldError
from services.genproto.rlhf.v1 import common_pb2, judge_pb2
from services.judge.servicer import checked_pairs
from services.judge.settings import JudgeSettings

SETTINGS = JudgeSettings(annotator="tests.integration.judge.rules:longer", max_pairs=2)


def pair(prompt="Q?", a="A.", b="B.", messages=None) -> judge_pb2.JudgedPair:
    asked = (
        common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=messages))
        if messages is not None
        else common_pb2.Prompt(text=prompt)
    )
    return judge_pb2.JudgedPair(prompt=asked, answer_a=a, answer_b=b)


def test_valid_pairs_render_the_prompt():
    turns = [
        common_pb2.ChatMessage(role="system", content="Be brief."),
        common_pb2.ChatMessage(role="user", content="Hi"),
    ]
    pairs = checked_pairs(judge_pb2.CompareRequest(pairs=[pair(), pair(messages=turns)]), SETTINGS)
    assert [(p.question, p.answer_a, p.answer_b) for p in pairs] == [
        ("Q?", "A.", "B."),
        ("system: Be brief.\nuser: Hi", "A.", "B."),
    ]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([], "pairs: empty batch"),
        ([pair()] * 3, "pairs: 3 pairs exceed the limit of 2"),
        ([pair(prompt=" ")], "pairs[0].prompt: empty prompt"),
        ([pair(), pair(a="")], "pairs[1].answer_a: empty answer"),
        ([pair(b="x" * 9000)], "pairs[0].answer_b: 9000 characters exceed the limit of 8000"),
        ([pair(messages=[])], "pairs[0].prompt.messages: empty prompt: no messages"),
        (
            [pair(messages=[common_pb2.ChatMessage(role="robot", content="x")])],
            "pairs[0].prompt.messages[0].role: 'robot' is not one of",
        ),
    ],
)
def test_bad_requests_name_the_field(pairs, message):
    with pytest.raises(FieldError) as caught:
        checked_pairs(judge_pb2.CompareRequest(pairs=pairs), SETTINGS)
    assert str(caught.value).startswith(message)


def test_settings_modes_and_names(monkeypatch):
    monkeypatch.setenv("RLHF_POLICY_MODEL_DIR", "/models/policy/v3")
    model = JudgeSettings()
    assert model.mode == "model"
    assert model.model_dir == Path("/models/policy/v3")  # the policy's folder by default
    assert model.judge_model == "v3"
    assert model.grpc.port == 50054 and model.grpc.metrics_port == 9104
    assert JudgeSettings(judge_name="smollm2-judge").judge_model == "smollm2-judge"
    assert JudgeSettings(policy_address="policy:50051").mode == "policy"
    monkeypatch.setenv("RLHF_JUDGE_ANNOTATOR", "services.common.annotator_rules:polite")
    monkeypatch.setenv("RLHF_JUDGE_PUBLISH", "true")
    rules = JudgeSettings()
    assert rules.mode == "rules" and rules.publish
    assert rules.judge_model == "services.common.annotator_rules:polite"
