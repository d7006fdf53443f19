"""The reward service through real gRPC and the real Triton server: scores equal the same model's
computed in process (same encoding as the reward-model trainer), concurrent requests share
forward passes, bad input is refused naming the field."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from services.common.control_auth import control_metadata
from services.common.models import load_reward_model, load_tokenizer
from services.genproto.rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.reward.encoding import encode_for_reward
from tests.support.scoring_stacks import reward_stack

PAIRS = [
    ("What is 2+2?", "4"),
    (
        "Write a haiku about the sea.",
        "Waves fold into foam / the grey gull counts every one / salt on the long wind",
    ),
    ("Hi", ""),
    (
        "Explain gradient descent in one sentence. " * 20,
        "Step downhill along the negative gradient, repeatedly.",
    ),
]


@pytest.fixture(scope="module")
def reward(triton_server, tiny_rm_dir):
    with reward_stack(
        triton_server, tiny_rm_dir, model_version=4, triton_queue_delay_us=20_000, max_length=64
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def stub(reward):
    with grpc.insecure_channel(reward.address) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def in_process_scores(model_dir, pairs: list[tuple[str, str]], max_length: int) -> np.ndarray:
    """The obvious computation: each pair alone through the trainer's encoding, no padding."""
    torch.set_num_threads(2)
    model = load_reward_model(model_dir, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(model_dir)
    scores = []
    with torch.inference_mode():
        for prompt, response in pairs:
            encoded = {
                k: torch.tensor([v])
                for k, v in encode_for_reward(tokenizer, prompt, response, max_length).items()
            }
            scores.append(model(**encoded).logits[0, 0].item())
    return np.array(scores)


def score_request(pairs: list[tuple[str, str]]) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        pairs=[
            reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text=p), response=r) for p, r in pairs
        ]
    )


def test_scores_equal_in_process_scoring_and_name_the_version(stub, tiny_rm_dir):
    reply = stub.Score(score_request(PAIRS), timeout=60)
    assert reply.reward_model_version == 4
    np.testing.assert_allclose(
        reply.scores, in_process_scores(tiny_rm_dir, PAIRS, 64), rtol=0, atol=1e-4
    )
    # One head: no ensemble, zero spreads, no member scores.
    assert reply.ensemble_size == 1 and list(reply.spreads) == [0.0] * len(PAIRS)
    assert list(reply.member_scores) == []


def test_chat_prompts_are_scored_as_role_content_lines(stub, tiny_rm_dir):
    messages = [("system", "Be brief."), ("user", "Name a prime.")]
    chat = common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages]
        )
    )
    reply = stub.Score(
        reward_pb2.ScoreRequest(pairs=[reward_pb2.ScoredPair(prompt=chat, response="7")]),
        timeout=60,
    )
    expected = in_process_scores(tiny_rm_dir, [("system: Be brief.\nuser: Name a prime.", "7")], 64)
    np.testing.assert_allclose(reply.scores, expected, rtol=0, atol=1e-4)


def test_concurrent_requests_share_forward_passes_and_stay_exact(stub, reward, tiny_rm_dir):
    pairs = [(f"Question number {i}?", "answer " * (i + 1)) for i in range(8)]
    replies: list = [None] * len(pairs)
    start = threading.Barrier(len(pairs))

    def call(i: int) -> None:
        start.wait()
        replies[i] = stub.Score(score_request([pairs[i]]), timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = np.array([r.scores[0] for r in replies])
    np.testing.assert_allclose(served, in_process_scores(tiny_rm_dir, pairs, 64), rtol=0, atol=1e-4)
    observed = reward.metric("rlhf_reward_model_batch_size_count")
    single = reward.metric("rlhf_reward_model_batch_size_bucket", {"le": "1.0"})
    assert observed - single > 0, "no Triton forward pass served more than one request"
    assert reward.metric("rlhf_reward_model_version") == 4


def _with_messages(*roles_contents) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in roles_contents]
        )
    )


@pytest.mark.parametrize(
    ("pairs", "model_name", "field"),
    [
        ([], "", "pairs: empty batch"),
        (
            [
                reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text="ok"), response="a"),
                reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text="  "), response="b"),
            ],
            "",
            "pairs[1].prompt: empty prompt",
        ),
        ([reward_pb2.ScoredPair(response="no prompt at all")], "", "pairs[0].prompt: empty prompt"),
        (
            [reward_pb2.ScoredPair(prompt=_with_messages(), response="x")],
            "",
            "pairs[0].prompt.messages: empty prompt",
        ),
        (
            [reward_pb2.ScoredPair(prompt=_with_messages(("wizard", "hi")), response="x")],
            "",
            "pairs[0].prompt.messages[0].role",
        ),
        (
            [reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text="q"), response="r" * 40_000)],
            "",
            "pairs[0].response: 40000 characters exceed",
        ),
        (
            [reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text="q"), response="r")],
            "gpt-9",
            "model: unknown model",
        ),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(stub, reward, pairs, model_name, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(reward_pb2.ScoreRequest(model=model_name, pairs=pairs), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_too_many_pairs_is_invalid_argument(stub, reward):
    limit = reward.settings.max_pairs
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(score_request([("q", "r")] * (limit + 1)), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"pairs: {limit + 1} pairs exceed the limit of {limit}" in error.value.details()


def test_bad_reload_requests_are_invalid_argument(stub):
    cases = [
        (
            reward_pb2.ReloadModelRequest(
                reward_model_version=0, path="/x", file_sha256={"a": "0" * 64}
            ),
            "reward_model_version",
        ),
        (
            reward_pb2.ReloadModelRequest(
                reward_model_version=5, path="relative/dir", file_sha256={"a": "0" * 64}
            ),
            "path",
        ),
        (
            reward_pb2.ReloadModelRequest(reward_model_version=5, path="/x"),
            "file_sha256: empty manifest",
        ),
        (
            reward_pb2.ReloadModelRequest(
                reward_model_version=5, path="/x", file_sha256={"a": "xyz"}
            ),
            "file_sha256['a']",
        ),
    ]
    for bad, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            stub.ReloadModel(bad, timeout=30, metadata=control_metadata())
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()
