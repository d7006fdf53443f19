"""The reference service through real gRPC and the real Triton server: log-probs equal the same
model's computed in process, concurrent requests share forward passes, bad input is refused."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from services.common.models import load_causal_lm
from services.genproto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from tests.support.scoring_stacks import reference_stack


@pytest.fixture(scope="module")
def reference(triton_server, tiny_lm_dir):
    with reference_stack(
        triton_server, tiny_lm_dir, triton_queue_delay_us=20_000, max_total_tokens=256
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def stub(reference):
    with grpc.insecure_channel(reference.address) as channel:
        yield reference_pb2_grpc.ReferenceServiceStub(channel)


@pytest.fixture(scope="module")
def model(tiny_lm_dir):
    torch.set_num_threads(2)
    return load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32)


def in_process_logprobs(model, prompt: list[int], response: list[int]) -> np.ndarray:
    """The obvious computation: one unpadded forward, log_softmax at the response positions."""
    ids = torch.tensor([prompt + response])  # (1, P + A)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (P + A, V)
    return np.array([logprobs[len(prompt) + j - 1, t].item() for j, t in enumerate(response)])


def random_sequences(
    seed: int, shapes: list[tuple[int, int]], vocab: int = 49152
) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, vocab, p).tolist(), rng.integers(0, vocab, a).tolist()) for p, a in shapes
    ]


def request(sequences) -> reference_pb2.ComputeLogprobsRequest:
    return reference_pb2.ComputeLogprobsRequest(
        sequences=[
            reference_pb2.TokenSequence(prompt_token_ids=p, response_token_ids=r)
            for p, r in sequences
        ]
    )


def test_logprobs_equal_in_process_for_a_batch_of_different_lengths(stub, model):
    sequences = random_sequences(0, [(3, 5), (17, 1), (1, 30), (9, 9), (40, 2)])
    reply = stub.ComputeLogprobs(request(sequences), timeout=60)
    assert len(reply.results) == len(sequences)
    for (prompt, response), result in zip(sequences, reply.results):
        served = np.array(result.logprobs)
        assert served.shape == (len(response),)
        np.testing.assert_allclose(
            served, in_process_logprobs(model, prompt, response), rtol=0, atol=1e-4
        )


def test_concurrent_requests_share_forward_passes_and_stay_exact(stub, model, reference):
    callers = 8
    sequences = random_sequences(1, [(2 + i, 3 + 2 * i) for i in range(callers)])
    replies: list = [None] * callers
    start = threading.Barrier(callers)

    def call(i: int) -> None:
        start.wait()
        replies[i] = stub.ComputeLogprobs(request([sequences[i]]), timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (prompt, response), reply in zip(sequences, replies):
        np.testing.assert_allclose(
            np.array(reply.results[0].logprobs),
            in_process_logprobs(model, prompt, response),
            rtol=0,
            atol=1e-4,
        )
    # Every request held one sequence: a forward pass over more than one means the batcher grouped them.
    observed = reference.metric("rlhf_reference_model_batch_size_count")
    single = reference.metric("rlhf_reference_model_batch_size_bucket", {"le": "1.0"})
    assert observed - single > 0, "no Triton forward pass served more than one request"


@pytest.mark.parametrize(
    ("sequences", "model_name", "field"),
    [
        ([], "", "sequences: empty batch"),
        ([([], [1, 2])], "", "sequences[0].prompt_token_ids: empty prompt"),
        ([([1], [])], "", "sequences[0].response_token_ids: empty response"),
        (
            [([1, 2], [3]), ([5], [7, 49152])],
            "",
            "sequences[1].response_token_ids[1]: token id 49152",
        ),
        ([([10**6], [3])], "", "sequences[0].prompt_token_ids[0]"),
        ([([1] * 200, [2] * 57)], "", "sequences[0]: 257 tokens exceed the model's limit of 256"),
        ([([1], [2])], "gpt-9", "model: unknown model 'gpt-9'"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub, reference, sequences, model_name, field
):
    before = (
        reference.metric(
            "rlhf_reference_requests_total",
            {"method": "ComputeLogprobs", "code": "INVALID_ARGUMENT"},
        )
        or 0
    )
    bad = request(sequences)
    bad.model = model_name
    with pytest.raises(grpc.RpcError) as error:
        stub.ComputeLogprobs(bad, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    after = reference.metric(
        "rlhf_reference_requests_total", {"method": "ComputeLogprobs", "code": "INVALID_ARGUMENT"}
    )
    assert after == before + 1


def test_a_deadline_too_short_for_the_model_is_deadline_exceeded(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.ComputeLogprobs(request(random_sequences(2, [(200, 50)] * 16)), timeout=0.01)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_overload_is_resource_exhausted_not_a_pile_up(reference):
    """A second front end on the same Triton model admitting one RPC at a time."""
    from services.common.grpc_server import GrpcSettings
    from services.reference.server import ReferenceService

    narrow = GrpcSettings(
        host="127.0.0.1", port=0, metrics_port=0, max_concurrent_rpcs=1, shutdown_grace_s=5
    )
    service = ReferenceService(reference.settings.model_copy(update={"grpc": narrow}))
    port = service.start()
    heavy = request(random_sequences(3, [(150, 100)] * 32))
    codes: list = []
    start = threading.Barrier(6)

    def call() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            start.wait()
            try:
                reference_pb2_grpc.ReferenceServiceStub(channel).ComputeLogprobs(heavy, timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())

    threads = [threading.Thread(target=call) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        service.stop(5)
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_the_dtype_setting_reaches_the_model_inside_triton(triton_server, tiny_lm_dir, model):
    """RLHF_REFERENCE_DTYPE=bfloat16 on the CPU: the served log-probs are the bf16 model's, not
    the float32 one's that `auto` gives on a CPU."""
    bf16 = load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.bfloat16)
    prompt, response = random_sequences(7, [(12, 20)])[0]
    with (
        reference_stack(triton_server, tiny_lm_dir, dtype="bfloat16") as stack,
        grpc.insecure_channel(stack.address) as channel,
    ):
        stub = reference_pb2_grpc.ReferenceServiceStub(channel)
        reply = stub.ComputeLogprobs(request([(prompt, response)]), timeout=60)
    served = np.array(reply.results[0].logprobs)
    to_bf16 = np.abs(served - in_process_logprobs(bf16, prompt, response)).max()
    to_f32 = np.abs(served - in_process_logprobs(model, prompt, response)).max()
    print(f"max |served - bf16| {to_bf16:.2e}, max |served - float32| {to_f32:.2e}")
    assert to_bf16 < 1e-6 < to_f32
