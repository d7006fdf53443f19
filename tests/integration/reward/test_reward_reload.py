"""Reloading the reward model through the real service and Triton: a valid new version takes over
(scores and version number), a wrong checksum, a wrong shape, an unlisted file or an old version
number is refused with the reason while the old version keeps serving, and requests scored while
a swap happens each carry the version that produced them."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest

from services.common.control_auth import control_metadata
from services.common.versions import manifest
from services.genproto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from tests.integration.reward.test_reward_service import PAIRS, in_process_scores, score_request
from tests.support.scoring_stacks import reward_stack
from tests.support.tiny_models import tiny_reward_model

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_rm_dir):
    """Published folders: v2 (same architecture, other weights) and a wrongly shaped one."""
    root = tmp_path_factory.mktemp("reward-versions")
    return {
        "v2": tiny_reward_model(root / "v2", seed=1),
        "wide": tiny_reward_model(root / "wide", seed=2, hidden=48),
    }


@pytest.fixture(scope="module")
def expected(versions, tiny_rm_dir):
    return {
        1: in_process_scores(tiny_rm_dir, PAIRS, MAX_LENGTH),
        2: in_process_scores(versions["v2"], PAIRS, MAX_LENGTH),
    }


@pytest.fixture(scope="module")
def stub(triton_server, tiny_rm_dir, tmp_path_factory):
    with (
        reward_stack(
            triton_server,
            tiny_rm_dir,
            model_version=1,
            max_length=MAX_LENGTH,
            triton_max_batch_size=4,
            reload_root=tmp_path_factory.getbasetemp(),  # the tests' folders, tmp_path included
        ) as stack,
        grpc.insecure_channel(stack.address) as channel,
    ):
        yield reward_pb2_grpc.RewardServiceStub(channel)


def reload(stub, version: int, path, file_sha256: dict[str, str]) -> reward_pb2.ReloadModelResponse:
    request = reward_pb2.ReloadModelRequest(
        reward_model_version=version, path=str(path), file_sha256=file_sha256
    )
    return stub.ReloadModel(request, timeout=120, metadata=control_metadata())


def assert_serving(stub, version: int, expected) -> None:
    reply = stub.Score(score_request(PAIRS), timeout=60)
    assert reply.reward_model_version == version
    np.testing.assert_allclose(reply.scores, expected[version], rtol=0, atol=1e-4)


def test_refusals_keep_the_old_version_serving(stub, versions, expected, tmp_path):
    assert_serving(stub, 1, expected)
    good = manifest(versions["v2"])

    wrong_checksum = dict(good, **{"model.safetensors": "0" * 64})
    refused = reload(stub, 2, versions["v2"], wrong_checksum)
    assert not refused.accepted and refused.reward_model_version == 1
    assert "sha256 mismatch for model.safetensors" in refused.reason

    refused = reload(stub, 2, versions["wide"], manifest(versions["wide"]))
    assert not refused.accepted and refused.reward_model_version == 1
    assert "tensors do not match the served model" in refused.reason and "shape [" in refused.reason

    extra = tmp_path / "v2-extra"
    shutil.copytree(versions["v2"], extra)
    (extra / "notes.txt").write_text("not in the manifest")
    refused = reload(stub, 2, extra, good)
    assert not refused.accepted and "files not in the manifest: notes.txt" in refused.reason

    refused = reload(stub, 1, versions["v2"], good)
    assert not refused.accepted and "not newer than the served version 1" in refused.reason

    refused = reload(stub, 2, tmp_path / "missing", good)
    assert not refused.accepted and "is not a folder" in refused.reason

    assert_serving(stub, 1, expected)


def test_a_valid_version_takes_over_while_requests_keep_flowing(stub, versions, expected):
    replies: list[reward_pb2.ScoreResponse] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def keep_scoring() -> None:
        while not stop.is_set():
            try:
                replies.append(stub.Score(score_request(PAIRS * 2), timeout=60))
            except grpc.RpcError as error:
                errors.append(error)

    scorers = [threading.Thread(target=keep_scoring) for _ in range(2)]
    for t in scorers:
        t.start()
    try:
        accepted = reload(stub, 2, versions["v2"], manifest(versions["v2"]))
        deadline = time.monotonic() + 30
        while not any(r.reward_model_version == 2 for r in list(replies)) and not errors:
            assert time.monotonic() < deadline, "no score from the new version within 30 s"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in scorers:
            t.join()
    assert accepted.accepted and accepted.reward_model_version == 2 and accepted.reason == ""
    assert errors == []
    # 8 pairs go to Triton as two chunks of 4 that a swap may fall between; still every score
    # of a reply comes from the one version it names.
    for reply in replies:
        np.testing.assert_allclose(
            reply.scores, np.tile(expected[reply.reward_model_version], 2), rtol=0, atol=1e-4
        )
    assert {r.reward_model_version for r in replies} <= {1, 2}
    assert_serving(stub, 2, expected)

    again = reload(stub, 2, versions["v2"], manifest(versions["v2"]))
    assert (
        again.accepted
        and again.reward_model_version == 2
        and again.reason == "already serving this version"
    )


def test_only_folders_under_the_reload_root_are_loaded(
    triton_server, tiny_rm_dir, versions, tmp_path
):
    root = versions["v2"].parent
    outside = tmp_path / "outside"
    shutil.copytree(versions["v2"], outside)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with (
        reward_stack(triton_server, tiny_rm_dir, max_length=MAX_LENGTH, reload_root=root) as s1,
        reward_stack(triton_server, tiny_rm_dir, max_length=MAX_LENGTH) as s2,
        grpc.insecure_channel(s1.address) as rooted,
        grpc.insecure_channel(s2.address) as rootless,
    ):
        stub = reward_pb2_grpc.RewardServiceStub(rooted)
        good = manifest(versions["v2"])
        for path in (outside, root / "link", root / ".." / outside.name, root):
            with pytest.raises(grpc.RpcError) as denied:
                reload(stub, 2, path, good)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, path
            assert f"under {root.resolve()}" in denied.value.details()
        with pytest.raises(grpc.RpcError) as off:
            reload(reward_pb2_grpc.RewardServiceStub(rootless), 2, versions["v2"], good)
        assert off.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "ReloadModel is off" in off.value.details()
        assert reload(stub, 2, versions["v2"], good).accepted  # inside the root: loaded
