"""Score and ReloadModel requests are checked field by field; chat prompts render as lines."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from services.common.rpc import FieldError, Forbidden, status_of
from services.genproto.rlhf.v1 import common_pb2, reward_pb2
from services.reward.encoding import render_prompt
from services.reward.servicer import checked_pairs, checked_reload
from services.reward.settings import RewardSettings


def settings(**overrides) -> RewardSettings:
    return RewardSettings(model_dir="/models/reward", **overrides)


def chat(*messages) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages]
        )
    )


def pair(prompt, response: str = "r") -> reward_pb2.ScoredPair:
    if isinstance(prompt, str):
        prompt = common_pb2.Prompt(text=prompt)
    return reward_pb2.ScoredPair(prompt=prompt, response=response)


def test_chat_prompts_render_as_role_content_lines():
    assert (
        render_prompt(chat(("system", "Be brief."), ("user", "Hi")))
        == "system: Be brief.\nuser: Hi"
    )
    assert render_prompt(common_pb2.Prompt(text="plain")) == "plain"
    # One user turn is what the person asked: the same string a ranking posted as text carries.
    assert render_prompt(chat(("user", "Why is the sky blue?"))) == "Why is the sky blue?"
    assert render_prompt(chat(("assistant", "Hello."))) == "assistant: Hello."


def test_a_valid_request_becomes_texts():
    request = reward_pb2.ScoreRequest(
        model="reward", pairs=[pair("q", ""), pair(chat(("user", "u")), "a")]
    )
    assert checked_pairs(request, settings()) == (["q", "u"], ["", "a"])


@pytest.mark.parametrize(
    ("pairs", "model", "overrides", "field"),
    [
        ([], "", {}, "pairs"),
        ([pair("q")] * 3, "", {"max_pairs": 2}, "pairs"),
        ([pair("q"), pair("")], "", {}, "pairs[1].prompt"),
        ([reward_pb2.ScoredPair(response="x")], "", {}, "pairs[0].prompt"),
        ([pair(chat())], "", {}, "pairs[0].prompt.messages"),
        ([pair(chat(("user", "a"), ("robot", "b")))], "", {}, "pairs[0].prompt.messages[1].role"),
        ([pair("q" * 11)], "", {"max_text_chars": 10}, "pairs[0].prompt"),
        ([pair("q", "r" * 11)], "", {"max_text_chars": 10}, "pairs[0].response"),
        ([pair("q")], "other", {}, "model"),
    ],
)
def test_bad_score_requests_name_the_field(pairs, model, overrides, field):
    with pytest.raises(FieldError) as error:
        checked_pairs(reward_pb2.ScoreRequest(model=model, pairs=pairs), settings(**overrides))
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        (
            {"reward_model_version": 0, "path": "/v", "file_sha256": {"m": "a" * 64}},
            "reward_model_version",
        ),
        ({"reward_model_version": 2, "path": "v", "file_sha256": {"m": "a" * 64}}, "path"),
        ({"reward_model_version": 2, "path": "/v"}, "file_sha256"),
        (
            {"reward_model_version": 2, "path": "/v", "file_sha256": {"m": "abc"}},
            "file_sha256['m']",
        ),
    ],
)
def test_bad_reload_requests_name_the_field(request_fields, field):
    with pytest.raises(FieldError) as error:
        checked_reload(reward_pb2.ReloadModelRequest(**request_fields), Path("/"))
    assert error.value.field == field
    checked_reload(
        reward_pb2.ReloadModelRequest(
            reward_model_version=2, path="/v", file_sha256={"m": "A" * 64}
        ),
        Path("/"),
    )


def test_reloads_only_from_version_folders_under_the_root(tmp_path: Path):
    root = tmp_path / "versions"
    (root / "v2").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)

    def request(path) -> reward_pb2.ReloadModelRequest:
        return reward_pb2.ReloadModelRequest(
            reward_model_version=2, path=str(path), file_sha256={"m": "A" * 64}
        )

    checked_reload(request(root / "v2"), root)
    for path in (root, root / ".." / "other", root / "escape" / "v2", tmp_path):
        with pytest.raises(Forbidden, match="only version folders under"):
            checked_reload(request(path), root)
    with pytest.raises(Forbidden, match="ReloadModel is off"):
        checked_reload(request(root / "v2"), None)


def test_triton_errors_map_to_grpc_codes():
    assert (
        status_of(InferenceServerException("late", status="StatusCode.DEADLINE_EXCEEDED"))
        == grpc.StatusCode.DEADLINE_EXCEEDED
    )
    assert (
        status_of(InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT"))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        status_of(InferenceServerException("down", status="StatusCode.UNKNOWN"))
        == grpc.StatusCode.UNAVAILABLE
    )
    assert status_of(InferenceServerException("?", status=None)) == grpc.StatusCode.UNAVAILABLE
    gone = InferenceServerException("unknown model", status="StatusCode.NOT_FOUND")
    assert status_of(gone) == grpc.StatusCode.UNAVAILABLE  # retried on another replica


def test_settings_read_their_env_prefixes(monkeypatch):
    monkeypatch.setenv("RLHF_REWARD_MODEL_DIR", "/models/reward/v7")
    monkeypatch.setenv("RLHF_REWARD_MODEL_VERSION", "7")
    monkeypatch.setenv("RLHF_REWARD_GRPC_MAX_CONCURRENT_RPCS", "5")
    monkeypatch.setenv("RLHF_TRITON_URL", "triton:8001")
    loaded = RewardSettings()
    assert loaded.model_version == 7 and str(loaded.model_dir) == "/models/reward/v7"
    assert loaded.grpc.max_concurrent_rpcs == 5 and loaded.grpc.port == 50052
    assert loaded.triton.url == "triton:8001"
