"""The model judge on the real Triton server: both orders of every pair are asked, each order's
probability equals the same tiny model's next-token probabilities of "A" and "B" computed in
process with transformers (to 1e-4), and the two are combined as documented. The same holds for
the judge that asks a real PolicyService (biased letters, top log-probs) instead."""

from __future__ import annotations

from contextlib import ExitStack

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.genproto.rlhf.v1 import common_pb2, judge_pb2
from services.judge.rubric import DEFAULT_CONSTITUTION, judge_messages, load_rubric
from tests.integration.judge.judge_stack import judge_stack
from tests.support.policy_stack import policy_stack

PAIRS = [
    ("What is 2 + 2?", "4", "It is 5."),
    ("Name a colour.", "Blue.", "I would rather not say."),
    ("How do I boil an egg?", "Put it in boiling water for 8 minutes.", "Eggs are food."),
]


@pytest.fixture(scope="module")
def judge(triton_server, tiny_lm_dir):
    with judge_stack(
        triton_server, tiny_lm_dir, rubric_file=DEFAULT_CONSTITUTION, max_length=1024
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def reference(tiny_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32).eval()
    return model, tokenizer


def p_first_in_process(reference, rubric, question: str, first: str, second: str) -> float:
    """P("A") / (P("A") + P("B")) at the next token, one unpadded forward pass."""
    model, tokenizer = reference
    text = tokenizer.apply_chat_template(
        judge_messages(rubric, question, first, second), tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    a, b = tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("B")
    return float(torch.exp(logprobs[a]) / (torch.exp(logprobs[a]) + torch.exp(logprobs[b])))


def request(pairs) -> judge_pb2.CompareRequest:
    return judge_pb2.CompareRequest(
        pairs=[
            judge_pb2.JudgedPair(prompt=common_pb2.Prompt(text=q), answer_a=a, answer_b=b)
            for q, a, b in pairs
        ]
    )


def test_both_orders_match_transformers_in_process(judge, reference):
    rubric = load_rubric(DEFAULT_CONSTITUTION)
    response = judge.stub().Compare(request(PAIRS), timeout=120)

    assert response.judge_model == judge.settings.model_dir.resolve().name
    assert response.rubric_version == "constitution-v1"
    assert response.published == 0
    assert len(response.verdicts) == len(PAIRS)
    for (question, a, b), verdict in zip(PAIRS, response.verdicts):
        expected_a_first = p_first_in_process(reference, rubric, question, a, b)
        expected_b_first = p_first_in_process(reference, rubric, question, b, a)
        assert verdict.p_a_first == pytest.approx(expected_a_first, abs=1e-4)
        assert verdict.p_b_first == pytest.approx(expected_b_first, abs=1e-4)
        # The orders differ (a random model has a position preference), and both were used.
        assert abs(expected_a_first - expected_b_first) > 1e-6
        expected = (expected_a_first + 1 - expected_b_first) / 2
        assert verdict.p_a_better == pytest.approx(expected, abs=1e-4)
        assert verdict.confidence == pytest.approx(abs(2 * expected - 1), abs=2e-4)
        assert verdict.preference_id == ""
    # The request histogram counts pairs (each pair is two rows for the model).
    assert judge.metric("rlhf_judge_request_pairs_sum") == len(PAIRS)


def test_swapping_the_answers_mirrors_the_verdict(judge):
    (question, a, b) = PAIRS[0]
    forward, backward = judge.stub().Compare(request([(question, a, b), (question, b, a)])).verdicts
    assert forward.p_a_first == pytest.approx(backward.p_b_first, abs=1e-5)
    assert forward.p_a_better == pytest.approx(1 - backward.p_a_better, abs=1e-5)


def test_info_names_the_model_mode_and_rubric(judge):
    info = judge.stub().GetJudgeInfo(judge_pb2.GetJudgeInfoRequest())
    assert info.mode == "model"
    assert info.rubric_version == "constitution-v1"
    assert "- harmless:" in info.rubric


def test_bad_input_is_invalid_argument(judge):
    stub = judge.stub()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Compare(request([("Hi?", "Hello.", "")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pairs[0].answer_b: empty answer" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Compare(judge_pb2.CompareRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Longer than max_length tokens: refused by the model inside Triton, with the reason.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Compare(request([("Hi?", "word " * 1500, "Hello.")]), timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than max_length=1024" in caught.value.details()


@pytest.fixture(scope="module")
def policy_judge(triton_server, tiny_lm_dir, tmp_path_factory):
    """The judge through a real PolicyService (the same tiny model in Triton)."""
    with ExitStack() as running:
        policy = running.enter_context(
            policy_stack(triton_server, None, tiny_lm_dir, tmp_path_factory.mktemp("policy"))
        )
        yield running.enter_context(
            judge_stack(
                None, tiny_lm_dir, policy_address=policy.address, rubric_file=DEFAULT_CONSTITUTION
            )
        )


def test_through_a_policy_service_the_biased_letters_give_the_same_verdicts(
    policy_judge, reference
):
    rubric = load_rubric(DEFAULT_CONSTITUTION)
    response = policy_judge.stub().Compare(request(PAIRS), timeout=120)
    assert response.judge_model == policy_judge.service.judge.name  # GetModelInfo's name
    assert policy_judge.stub().GetJudgeInfo(judge_pb2.GetJudgeInfoRequest()).mode == "policy"
    for (question, a, b), verdict in zip(PAIRS, response.verdicts):
        expected_a_first = p_first_in_process(reference, rubric, question, a, b)
        expected_b_first = p_first_in_process(reference, rubric, question, b, a)
        assert verdict.p_a_first == pytest.approx(expected_a_first, abs=1e-4)
        assert verdict.p_b_first == pytest.approx(expected_b_first, abs=1e-4)
        expected = (expected_a_first + 1 - expected_b_first) / 2
        assert verdict.p_a_better == pytest.approx(expected, abs=1e-4)
