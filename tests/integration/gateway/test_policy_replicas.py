"""The gateway reaches every policy replica: given two real policy services (a list; in
Kubernetes the headless Service name), chat completions go to both, and when one is stopped
every completion still succeeds on the other."""

from __future__ import annotations

import httpx

from tests.integration.gateway.gateway_process import running_gateway
from tests.support.policy_stack import policy_stack


def generated(stack) -> float:
    return sum(
        stack.registry.get_sample_value(
            "rlhf_policy_requests_total", {"method": method, "code": "OK"}
        )
        or 0.0
        for method in ("Generate", "GenerateStream")
    )


def chat(gw, n: int) -> None:
    for i in range(n):
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={
                "model": "policy",
                "messages": [{"role": "user", "content": f"Hello number {i}"}],
                "max_tokens": 2,
            },
            headers=gw.headers,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None


def test_completions_spread_over_replicas_and_survive_one_going_away(
    triton_server, kafka_settings, tiny_lm_dir, tmp_path, run_dir
):
    common = {"model_name": "policy", "log_generations": False, "follow_weights_topic": False}
    with (
        policy_stack(triton_server, kafka_settings, tiny_lm_dir, tmp_path / "a", **common) as a,
        policy_stack(triton_server, kafka_settings, tiny_lm_dir, tmp_path / "b", **common) as b,
        running_gateway(
            kafka_settings,
            run_dir / "gateway-replicas",
            policy_url=f"{a.address},{b.address}",
            rate_limit_burst=1000,
        ) as gw,
    ):
        chat(gw, 8)
        assert generated(a) >= 2 and generated(b) >= 2  # round robin reached both
        a.service.stop(grace_s=1.0)
        before = generated(b)
        chat(gw, 6)
        assert generated(b) == before + 6  # every completion after the stop, on the live one
