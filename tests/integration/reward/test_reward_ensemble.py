"""A reward-model ensemble served by the real reward service on the real Triton server: each
pair's score is the mean of the heads computed in process, its spread their population std and
its member scores the heads themselves, pair-major; a reload to a version with another head
count is refused by the tensor check while the ensemble keeps serving, and one with the same
count takes over."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from services.common.control_auth import control_metadata
from services.common.models import load_reward_model, load_tokenizer
from services.common.versions import manifest
from services.genproto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward.encoding import encode_for_reward
from tests.integration.reward.test_reward_service import PAIRS, score_request
from tests.support.scoring_stacks import reward_stack, tiny_ensemble_reward_model
from tests.support.tiny_models import tiny_reward_model

MAX_LENGTH = 64
HEADS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-ensemble")
    return {
        "v1": tiny_ensemble_reward_model(root / "v1", heads=HEADS, seed=0),
        "v2": tiny_ensemble_reward_model(root / "v2", heads=HEADS, seed=5),
        "one_head": tiny_reward_model(root / "one-head", seed=3),
    }


@pytest.fixture(scope="module")
def stub(triton_server, folders, tmp_path_factory):
    with (
        reward_stack(
            triton_server,
            folders["v1"],
            model_version=1,
            max_length=MAX_LENGTH,
            triton_max_batch_size=3,  # PAIRS in two chunks: the members of both are joined
            reload_root=tmp_path_factory.getbasetemp(),
        ) as stack,
        grpc.insecure_channel(stack.address) as channel,
    ):
        yield reward_pb2_grpc.RewardServiceStub(channel)


def in_process_heads(model_dir, pairs) -> np.ndarray:
    """(pairs, heads): each pair alone through the trainer's encoding, every head's output."""
    model = load_reward_model(model_dir, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(model_dir)
    rows = []
    with torch.inference_mode():
        for prompt, response in pairs:
            encoded = encode_for_reward(tokenizer, prompt, response, MAX_LENGTH)
            rows.append(model(**{k: torch.tensor([v]) for k, v in encoded.items()}).logits[0])
    return torch.stack(rows).double().numpy()


def assert_ensemble(reply, heads: np.ndarray, version: int) -> None:
    assert reply.reward_model_version == version and reply.ensemble_size == HEADS
    members = np.array(reply.member_scores).reshape(len(PAIRS), HEADS)  # pair-major
    np.testing.assert_allclose(members, heads, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reply.scores, heads.mean(axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(reply.spreads, heads.std(axis=1), rtol=0, atol=1e-5)


def test_scores_are_the_heads_mean_and_spreads_their_std(stub, folders):
    heads = in_process_heads(folders["v1"], PAIRS)
    assert heads.shape == (len(PAIRS), HEADS) and heads.std(axis=1).min() > 1e-3  # they differ
    assert_ensemble(stub.Score(score_request(PAIRS), timeout=60), heads, version=1)


def _reload(stub, version: int, folder) -> reward_pb2.ReloadModelResponse:
    request = reward_pb2.ReloadModelRequest(
        reward_model_version=version, path=str(folder), file_sha256=manifest(folder)
    )
    return stub.ReloadModel(request, timeout=120, metadata=control_metadata())


def test_a_version_with_another_head_count_is_refused_and_one_with_the_same_takes_over(
    stub, folders
):
    refused = _reload(stub, 2, folders["one_head"])
    assert not refused.accepted and refused.reward_model_version == 1
    assert "tensors do not match the served model" in refused.reason
    assert "classifier" in refused.reason
    assert_ensemble(
        stub.Score(score_request(PAIRS), timeout=60), in_process_heads(folders["v1"], PAIRS), 1
    )

    accepted = _reload(stub, 2, folders["v2"])
    assert accepted.accepted and accepted.reward_model_version == 2, accepted.reason
    assert_ensemble(
        stub.Score(score_request(PAIRS), timeout=60), in_process_heads(folders["v2"], PAIRS), 2
    )
