"""Continuous batching through the real gRPC server and the real Triton model: a request that
joins a running batch (one that started earlier and ends later) gets the tokens and log-probs it
gets alone, greedy and sampled; n samples prefilled once equal the same samples prefilled one by
one; overload is queued (or RESOURCE_EXHAUSTED past the wait), never a crash."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from tests.integration.policy.test_generation import generate, sampling
from tests.support.policy_stack import policy_stack

LONG_PROMPT = "A much longer prompt, with more tokens in it than the other one, goes first"


def stream(stub, text: str, **kw):
    return stub.GenerateStream(
        policy_pb2.GenerateStreamRequest(
            prompt=common_pb2.Prompt(text=text), sampling=sampling(**kw)
        ),
        timeout=120,
    )


def collect(call) -> tuple[list[int], list[float], int]:
    tokens, logprobs, finish = [], [], 0
    for chunk in call:
        tokens += list(chunk.token_ids)
        logprobs += list(chunk.logprobs)
        finish = chunk.finish_reason or finish
    return tokens, logprobs, finish


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "presence_penalty": 0.5}],
    ids=["greedy", "sampled"],
)
def test_a_request_joining_a_running_batch_equals_it_alone(stub, params):
    early_kw = {"temperature": 1.0, "seed": 3, "has_seed": True, "max_new_tokens": 60}
    joiner_kw = {"seed": 21, "has_seed": True, "max_new_tokens": 12, **params}
    early_alone = collect(stream(stub, LONG_PROMPT, **early_kw))
    joiner_alone = generate(stub, ["Hi"], **joiner_kw).completions[0].samples[0]

    early = stream(stub, LONG_PROMPT, **early_kw)
    first = next(early)  # the early request is generating
    joined = generate(stub, ["Hi"], **joiner_kw).completions[0].samples[0]
    rest = collect(early)  # ... and still is once the joiner is done
    assert len(first.token_ids) + len(rest[0]) == 60 and len(rest[0]) > 12

    assert list(joined.token_ids) == list(joiner_alone.token_ids)
    assert max(abs(a - b) for a, b in zip(joined.logprobs, joiner_alone.logprobs)) < 1e-4
    assert list(first.token_ids) + rest[0] == early_alone[0]
    early_logprobs = list(first.logprobs) + rest[1]
    assert max(abs(a - b) for a, b in zip(early_logprobs, early_alone[1])) < 1e-4


def test_a_short_request_does_not_wait_for_a_running_batch(stub):
    early = stream(stub, LONG_PROMPT, temperature=0.0, max_new_tokens=200)
    next(early)
    start = time.monotonic()
    response = generate(stub, ["Hi"], temperature=0.0, max_new_tokens=4)
    joined_s = time.monotonic() - start
    tokens = sum(len(chunk.token_ids) for chunk in early)
    early_s = time.monotonic() - start
    assert len(response.completions[0].samples[0].token_ids) == 4 and tokens >= 150
    # A static batch would have made it wait for the early request's 200 steps.
    assert joined_s < early_s / 3, (joined_s, early_s)


@pytest.fixture(scope="module")
def queued(triton_server, tiny_lm_dir, tmp_path_factory):
    """A second service: admission queues (4 sequences, 400 KV tokens), prefixes not shared."""
    with policy_stack(
        triton_server,
        None,
        tiny_lm_dir,
        tmp_path_factory.mktemp("queued"),
        max_n=4,
        max_queued_sequences=4,
        max_kv_tokens=400,
        max_total_tokens=512,
        admission="queue",
        admission_queue_timeout_s=30.0,
        share_prefix=False,
    ) as stack:
        channel = grpc.insecure_channel(stack.address)
        yield stack, policy_pb2_grpc.PolicyServiceStub(channel)
        channel.close()


def test_shared_prefix_samples_equal_unshared_ones(stub, queued):
    _, unshared_stub = queued
    kw = {"n": 4, "temperature": 1.0, "top_k": 50, "seed": 77, "has_seed": True}
    shared = generate(stub, [LONG_PROMPT], max_new_tokens=16, **kw).completions[0].samples
    unshared = generate(unshared_stub, [LONG_PROMPT], max_new_tokens=16, **kw).completions[0]
    assert len({tuple(s.token_ids) for s in shared}) == 4
    for a, b in zip(shared, unshared.samples):
        assert list(a.token_ids) == list(b.token_ids)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_overload_waits_for_room_then_is_served(queued):
    stack, stub = queued
    # Two streams reserve 2 x (prompt + 150) of the 400 KV tokens: a third must wait.
    calls = [stream(stub, "Hi", temperature=0.0, max_new_tokens=150) for _ in range(2)]
    for call in calls:
        next(call)
    result = {}

    def third() -> None:
        try:
            result["response"] = generate(stub, ["Hello"], max_new_tokens=150)
        except grpc.RpcError as exc:
            result["error"] = exc

    thread = threading.Thread(target=third)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if stack.registry.get_sample_value("rlhf_policy_admission_waiting_sequences") == 1:
                break
            time.sleep(0.05)
        assert stack.registry.get_sample_value("rlhf_policy_admission_waiting_sequences") == 1
        assert stack.registry.get_sample_value("rlhf_policy_queue_depth") == 2
        assert stack.registry.get_sample_value("rlhf_policy_kv_reserved_tokens") > 300
        assert thread.is_alive()
    finally:
        calls[0].cancel()  # room for the third
    thread.join(timeout=120)
    calls[1].cancel()
    assert "error" not in result, result.get("error")
    assert len(result["response"].completions[0].samples[0].token_ids) == 150


def test_overload_past_the_wait_is_resource_exhausted(queued):
    _, stub = queued
    calls = [stream(stub, "Hi", temperature=0.0, max_new_tokens=180) for _ in range(2)]
    try:
        for call in calls:
            next(call)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(
                policy_pb2.GenerateRequest(
                    prompts=[common_pb2.Prompt(text="Hello")], sampling=sampling(max_new_tokens=100)
                ),
                timeout=1.0,
            )
        assert err.value.code() in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        assert time.monotonic() - start < 5
    finally:
        for call in calls:
            call.cancel()
    time.sleep(0.5)
    response = generate(stub, ["Hello"], n=2, max_new_tokens=3)
    assert [len(s.token_ids) for s in response.completions[0].samples] == [3, 3]
