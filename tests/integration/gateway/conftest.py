"""Real gateway processes on the session's real Kafka broker: one without a policy (feedback
paths), and one in front of a real policy service (Triton + gRPC, tests/support/policy_stack)."""

from __future__ import annotations

import pytest

from tests.integration.gateway.gateway_process import running_gateway
from tests.support.policy_stack import policy_stack

POLICY_LIMITS = {
    "max_n": 4,
    "max_sequences_per_request": 8,
    "max_queued_sequences": 16,
    "max_total_tokens": 512,
    "default_max_new_tokens": 8,
}


@pytest.fixture(scope="module")
def gateway(kafka_settings, run_dir):
    with running_gateway(
        kafka_settings, run_dir / "gateway", rate_limit_burst=10_000, rate_limit_per_s=10_000
    ) as gw:
        yield gw


@pytest.fixture(scope="session")
def policy(triton_server, kafka_settings, tiny_lm_dir, tmp_path_factory):
    """Serves tiny_lm_dir's own weights for the whole session: it does not follow
    rlhf.weights.v1, where the policy tests announce new versions under the same model name
    (the OpenAI tests compare its answers with the model in process)."""
    with policy_stack(
        triton_server,
        kafka_settings,
        tiny_lm_dir,
        tmp_path_factory.mktemp("gateway-policy"),
        follow_weights_topic=False,
        **POLICY_LIMITS,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def chat_gateway(policy, kafka_settings, run_dir):
    with running_gateway(
        kafka_settings,
        run_dir / "gateway",
        policy_url=policy.address,
        rate_limit_burst=10_000,
        rate_limit_per_s=10_000,
        max_new_tokens_limit=16,
    ) as gw:
        yield gw
