"""PolicyService generation through the real gRPC server and the real Triton model, against the
same model in process: greedy tokens, log-probs under the distribution actually sampled from,
seeds, streaming, cancellation, stop strings, chat prompts, bad input, overload, Kafka log."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
import torch

from services.common.kafka import decode, make_consumer
from services.common.topics import GENERATIONS
from services.genproto.rlhf.v1 import common_pb2, events_pb2, policy_pb2

PROMPTS = ["The cat sat on", "A much longer prompt, with more tokens in it than the first one"]


def reference_logprobs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Log-probs (V,) of the distribution sampled from, written the plain way for one position."""
    if temperature == 0:
        return torch.log_softmax(logits, -1)
    scaled = logits / temperature
    if top_k > 0:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    probs, order = torch.softmax(scaled, -1).sort(descending=True)
    keep = int((probs.cumsum(-1) < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
    kept = torch.full_like(scaled, float("-inf"))
    kept[order[:keep]] = scaled[order[:keep]]
    return torch.log_softmax(kept, -1)


def sampling(**kw) -> policy_pb2.SamplingParams:
    kw.setdefault("n", 1)
    kw.setdefault("max_new_tokens", 10)
    return policy_pb2.SamplingParams(**kw)


def generate(stub, prompts, **kw) -> policy_pb2.GenerateResponse:
    return stub.Generate(
        policy_pb2.GenerateRequest(
            prompts=[common_pb2.Prompt(text=p) for p in prompts], sampling=sampling(**kw)
        ),
        timeout=60,
    )


def test_greedy_equals_in_process_generate(stub, reference):
    model, tok = reference
    response = generate(stub, PROMPTS, temperature=0.0, max_new_tokens=12)
    for prompt, completion in zip(PROMPTS, response.completions):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
        sample = completion.samples[0]
        assert list(completion.prompt_token_ids) == ids[0].tolist()
        assert list(sample.token_ids) == expected[0, ids.shape[1] :].tolist()
        assert sample.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert sample.text == tok.decode(list(sample.token_ids), skip_special_tokens=True)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        {"temperature": 0.8, "top_k": 20},
        {"temperature": 1.3, "top_p": 0.9},
        {"temperature": 0.6, "top_k": 50, "top_p": 0.7},
    ],
)
def test_logprobs_equal_in_process(stub, reference, params):
    model, _ = reference
    response = generate(stub, PROMPTS, n=2, seed=11, has_seed=True, **params)
    for completion in response.completions:
        for sample in completion.samples:
            ids = list(completion.prompt_token_ids) + list(sample.token_ids)
            with torch.inference_mode():
                logits = model(torch.tensor([ids])).logits[0]  # (T, V)
            start = len(completion.prompt_token_ids)
            for t, (token, served) in enumerate(zip(sample.token_ids, sample.logprobs)):
                expected = reference_logprobs(
                    logits[start + t - 1],
                    params["temperature"],
                    params.get("top_k", 0),
                    params.get("top_p", 1.0),
                )[token].item()
                assert abs(served - expected) < 1e-4, (t, served, expected)


def test_same_seed_same_output_and_stream_equals_unary(stub):
    kw = {
        "n": 2,
        "temperature": 1.0,
        "top_p": 0.95,
        "seed": 42,
        "has_seed": True,
        "max_new_tokens": 8,
    }
    a = generate(stub, PROMPTS[:1], **kw).completions[0].samples
    b = generate(stub, PROMPTS[:1], **kw).completions[0].samples
    assert [list(s.token_ids) for s in a] == [list(s.token_ids) for s in b]
    assert list(a[0].token_ids) != list(a[1].token_ids)
    streamed = {0: [], 1: []}
    finished = {}
    for chunk in stub.GenerateStream(
        policy_pb2.GenerateStreamRequest(
            prompt=common_pb2.Prompt(text=PROMPTS[0]), sampling=sampling(**kw)
        ),
        timeout=60,
    ):
        streamed[chunk.sample_index] += list(chunk.token_ids)
        if chunk.finish_reason:
            finished[chunk.sample_index] = chunk.finish_reason
    assert [streamed[0], streamed[1]] == [list(s.token_ids) for s in a]
    assert finished == {0: common_pb2.FINISH_REASON_LENGTH, 1: common_pb2.FINISH_REASON_LENGTH}


def test_chat_prompt_goes_through_the_chat_template(stub, reference):
    _, tok = reference
    messages = [common_pb2.ChatMessage(role="user", content="Hi there")]
    prompt = common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=messages))
    response = stub.Generate(
        policy_pb2.GenerateRequest(prompts=[prompt], sampling=sampling(max_new_tokens=3)),
        timeout=60,
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        list(response.completions[0].prompt_token_ids)
        == tok(text, add_special_tokens=False)["input_ids"]
    )


def test_stop_string_ends_the_sample(stub):
    free = generate(stub, PROMPTS[:1], max_new_tokens=12).completions[0].samples[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    cut = free.text.find(stop)
    stopped = generate(stub, PROMPTS[:1], max_new_tokens=12, stop=[stop]).completions[0].samples[0]
    assert stopped.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert stopped.text == free.text[:cut]
    assert len(stopped.token_ids) < len(free.token_ids)
    assert list(stopped.token_ids) == list(free.token_ids)[: len(stopped.token_ids)]


def triton_tokens(triton_server, model: str) -> float:
    text = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if (
            line.startswith("rlhf_policy_model_generated_tokens_total")
            and f'model="{model}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_cancelled_stream_stops_generating_in_triton(stub, policy, triton_server):
    before = triton_tokens(triton_server, policy.settings.triton_model)
    call = stub.GenerateStream(
        policy_pb2.GenerateStreamRequest(
            prompt=common_pb2.Prompt(text="Hello"), sampling=sampling(max_new_tokens=480)
        ),
        timeout=120,
    )
    received = 0
    for chunk in call:
        received += len(chunk.token_ids)
        if received >= 3:
            break
    call.cancel()
    time.sleep(1.5)
    after_cancel = triton_tokens(triton_server, policy.settings.triton_model)
    time.sleep(1.5)
    later = triton_tokens(triton_server, policy.settings.triton_model)
    assert later == after_cancel, "the model kept generating after the stream was cancelled"
    assert 3 <= after_cancel - before < 480


@pytest.mark.parametrize(
    "request_kw,field",
    [
        ({"prompts": [common_pb2.Prompt(text="   ")]}, "prompts[0]"),
        ({"prompts": []}, "prompts"),
        ({"prompts": [common_pb2.Prompt(text="hi " * 700)]}, "prompts[0]: too many tokens"),
        ({"sampling": sampling(max_new_tokens=600)}, "sampling.max_new_tokens"),
        ({"sampling": sampling(temperature=-0.1)}, "sampling.temperature"),
        ({"sampling": sampling(top_p=1.5)}, "sampling.top_p"),
        ({"sampling": sampling(top_p=-0.2)}, "sampling.top_p"),
        ({"sampling": sampling(presence_penalty=2.5)}, "sampling.presence_penalty"),
        ({"sampling": sampling(logit_bias={10**6: 1.0})}, "sampling.logit_bias"),
        ({"sampling": sampling(top_logprobs=21)}, "sampling.top_logprobs"),
        ({"sampling": sampling(n=5)}, "sampling.n"),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(stub, request_kw, field):
    request = {"prompts": [common_pb2.Prompt(text="hello")], "sampling": sampling()}
    request.update(request_kw)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(policy_pb2.GenerateRequest(**request), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


def test_overload_is_resource_exhausted(stub):
    long = {"n": 4, "max_new_tokens": 400}
    calls = [
        stub.GenerateStream(
            policy_pb2.GenerateStreamRequest(
                prompt=common_pb2.Prompt(text="Hi"), sampling=sampling(**long)
            ),
            timeout=120,
        )
        for _ in range(2)
    ]
    try:
        for call in calls:
            next(call)  # both admitted: 8 of 10 queue slots taken
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, ["Hello"], n=4, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call in calls:
            call.cancel()
    time.sleep(0.5)
    assert len(generate(stub, ["Hello"], n=2, max_new_tokens=2).completions[0].samples) == 2


def test_deadline_is_honoured(stub):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(
            policy_pb2.GenerateRequest(
                prompts=[common_pb2.Prompt(text="Hi")], sampling=sampling(max_new_tokens=480)
            ),
            timeout=0.3,
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5


def test_generation_record_arrives_in_kafka(stub, kafka_settings, policy):
    response = generate(
        stub, PROMPTS, n=2, temperature=0.9, seed=5, has_seed=True, max_new_tokens=5
    )
    samples = {s.response_id: s for c in response.completions for s in c.samples}
    assert len(samples) == 4
    consumer = make_consumer(
        kafka_settings, group_id=f"policy-test-{time.time_ns()}", topics=[GENERATIONS]
    )
    found = {}
    deadline = time.monotonic() + 30
    try:
        while len(found) < len(samples) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                for r in records:
                    if r.key.decode() in samples:
                        found[r.key.decode()] = decode(events_pb2.GenerationRecord, r.value)
    finally:
        consumer.close()
    assert set(found) == set(samples)
    for rid, record in found.items():
        assert record.response_id == rid
        assert list(record.response_token_ids) == list(samples[rid].token_ids)
        assert list(record.logprobs) == pytest.approx(list(samples[rid].logprobs))
        assert record.weights_version == samples[rid].weights_version
        assert record.model == policy.model_name
