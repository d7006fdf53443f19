"""A reward replica that missed a ReloadModel (it was restarting, or it is new) serves what the
publisher's versions_root/CURRENT names: at start, before it takes traffic, and whenever CURRENT
changes; a version its checks refuse is not served and not tried again."""

from __future__ import annotations

import time

import grpc
import numpy as np

from services.common.versions import manifest, write_published
from services.genproto.rlhf.v1 import reward_pb2_grpc
from tests.integration.reward.test_reward_service import PAIRS, in_process_scores, score_request
from tests.support.scoring_stacks import reward_stack
from tests.support.tiny_models import tiny_reward_model

MAX_LENGTH = 64


def _score(stub):
    reply = stub.Score(score_request(PAIRS), timeout=60)
    return reply.reward_model_version, np.array(reply.scores)


def test_a_started_service_serves_the_published_version_and_follows_current(
    triton_server, tiny_rm_dir, tmp_path
):
    root = tmp_path / "versions"
    v2 = tiny_reward_model(root / "v00000002", seed=1)
    write_published(root, 2, v2, manifest(v2))  # published while this replica was down

    with (
        reward_stack(
            triton_server,
            tiny_rm_dir,
            model_version=1,
            max_length=MAX_LENGTH,
            versions_root=root,
            follow_interval_s=0.3,
        ) as stack,
        grpc.insecure_channel(stack.address) as channel,
    ):
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        version, scores = _score(stub)  # the very first request already gets version 2
        assert version == 2
        np.testing.assert_allclose(scores, in_process_scores(v2, PAIRS, MAX_LENGTH), atol=1e-4)

        v3 = tiny_reward_model(root / "v00000003", seed=3)
        write_published(root, 3, v3, manifest(v3))
        deadline = time.monotonic() + 30
        while _score(stub)[0] != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        version, scores = _score(stub)
        assert version == 3
        np.testing.assert_allclose(scores, in_process_scores(v3, PAIRS, MAX_LENGTH), atol=1e-4)

        wide = tiny_reward_model(root / "v00000004", seed=2, hidden=48)  # another architecture
        write_published(root, 4, wide, manifest(wide))
        deadline = time.monotonic() + 30
        while 4 not in stack.follower.refused and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stack.follower.refused == {4}
        reloads = stack.follower.reloads
        assert reloads == 3  # v2 at start, v3, v4
        time.sleep(1.5)  # several more intervals: not retried, v3 keeps serving
        assert stack.follower.reloads == reloads and _score(stub)[0] == 3
