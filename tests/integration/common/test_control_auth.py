"""The control plane takes only authenticated callers: on a real reward service, ReloadModel
without the control token, or with a wrong one, is UNAUTHENTICATED; with no token configured at
all it is refused (fails closed); with the token it proceeds. Other calls need no token, and the
token never appears in a log line."""

from __future__ import annotations

import logging

import grpc
import pytest

from services.common.control_auth import control_metadata
from services.common.versions import manifest
from services.genproto.rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from tests.support.scoring_stacks import reward_stack
from tests.support.tiny_models import tiny_reward_model

TOKEN = "control-token-for-this-test-4f1d2a"
SCORE = reward_pb2.ScoreRequest(
    pairs=[reward_pb2.ScoredPair(prompt=common_pb2.Prompt(text="q"), response="a")]
)


def reload_request(folder) -> reward_pb2.ReloadModelRequest:
    return reward_pb2.ReloadModelRequest(
        reward_model_version=2, path=str(folder), file_sha256=manifest(folder)
    )


def test_reload_needs_the_token_and_nothing_logs_it(
    triton_server, tiny_rm_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("RLHF_CONTROL_TOKEN", TOKEN)
    v2 = tiny_reward_model(tmp_path / "versions" / "v2", seed=1)
    caplog.set_level(logging.DEBUG)
    with (
        reward_stack(triton_server, tiny_rm_dir, reload_root=tmp_path / "versions") as stack,
        grpc.insecure_channel(stack.address) as channel,
    ):
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        assert len(stub.Score(SCORE, timeout=60).scores) == 1  # data-plane calls: no token
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ReloadModel(reload_request(v2), timeout=60, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert stub.Score(SCORE, timeout=60).reward_model_version == 1  # nothing changed
        reply = stub.ReloadModel(reload_request(v2), timeout=120, metadata=control_metadata())
        assert reply.accepted and reply.reward_model_version == 2
        assert stub.Score(SCORE, timeout=60).reward_model_version == 2
    assert caplog.records, "the service logged nothing: the check below would prove nothing"
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(stack.settings)


def test_without_a_configured_token_control_calls_fail_closed(
    triton_server, tiny_rm_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("RLHF_CONTROL_TOKEN", raising=False)
    monkeypatch.delenv("RLHF_CONTROL_TOKEN_FILE", raising=False)
    v2 = tiny_reward_model(tmp_path / "versions" / "v2", seed=1)
    with (
        reward_stack(triton_server, tiny_rm_dir, reload_root=tmp_path / "versions") as stack,
        grpc.insecure_channel(stack.address) as channel,
    ):
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReloadModel(
                reload_request(v2), timeout=60, metadata=[("authorization", "Bearer anything")]
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no control token or client identity is configured" in refused.value.details()
