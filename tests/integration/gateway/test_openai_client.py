"""The official `openai` Python client against the real gateway, in front of the real policy
service on the real Triton server (tiny model): non-streaming, streaming with usage, n > 1,
log-probs equal to the policy's own, penalties and logit bias doing what OpenAI's formula says
(checked against the model in process), length bounds, each refusal and unknown models as
OpenAI's errors, ignored fields accepted. `curl` shows the raw SSE framing."""

from __future__ import annotations

import json
import subprocess

import grpc
import openai
import pytest
import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
MODEL = "policy"  # the gateway's alias of the served policy (what the demo and chat page send)


@pytest.fixture(scope="module")
def client(chat_gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{chat_gateway.url}/v1", api_key=chat_gateway.api_key, timeout=120, max_retries=0
    )


@pytest.fixture(scope="module")
def stub(policy):
    channel = grpc.insecure_channel(policy.address)
    yield policy_pb2_grpc.PolicyServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(tiny_lm_dir):
    """The served model in process, and the prompt ids the policy renders for MESSAGES."""
    model = load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(tiny_lm_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return model, tok, tok(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def openai_greedy(model, prompt: list[int], steps: int, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding with OpenAI's adjustments written out: logit + bias - presence *
    (count > 0) - frequency * count over the tokens generated so far (full re-run per step)."""
    tokens: list[int] = []
    for _ in range(steps):
        logits = model(torch.tensor([prompt + tokens])).logits[0, -1].clone()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set(tokens):
            logits[t] -= presence + frequency * tokens.count(t)
        tokens.append(int(logits.argmax()))
    return tokens


def test_non_streaming(client, policy):
    reply = client.chat.completions.create(
        model=policy.model_name, messages=MESSAGES, max_tokens=6, temperature=0, seed=3
    )
    assert reply.object == "chat.completion" and reply.model == policy.model_name
    (choice,) = reply.choices
    assert reply.id == choice.model_extra["response_id"]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"} and choice.logprobs is None
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.system_fingerprint == f"weights-v{policy.weights_version}"


def test_stream_with_usage_and_n_equals_the_unary_answer(client):
    kw = {
        "model": MODEL,
        "messages": MESSAGES,
        "n": 2,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 17,
    }
    unary = client.chat.completions.create(**kw)
    assert len(unary.choices) == 2
    assert unary.choices[0].message.content != unary.choices[1].message.content
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *choice_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == unary.usage.model_dump()
    assert all(c.usage is None for c in choice_chunks)
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in choice_chunks:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in unary.choices]
    assert finishes == {i: c.finish_reason for i, c in enumerate(unary.choices)}


def test_logprobs_are_the_policys_own(client, stub):
    kw = {"temperature": 0.8, "seed": 5, "max_tokens": 6}
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, **kw
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    direct = (
        stub.Generate(
            policy_pb2.GenerateRequest(
                prompts=[
                    common_pb2.Prompt(
                        messages=common_pb2.ChatMessages(
                            messages=[common_pb2.ChatMessage(**m) for m in MESSAGES]
                        )
                    )
                ],
                sampling=policy_pb2.SamplingParams(
                    max_new_tokens=6, temperature=0.8, seed=5, has_seed=True, top_logprobs=3
                ),
            ),
            timeout=60,
        )
        .completions[0]
        .samples[0]
    )
    assert [t.logprob for t in content] == pytest.approx(list(direct.logprobs), abs=1e-6)
    assert [t.token for t in content] == [p.sampled.text for p in direct.token_logprobs]
    for token, position in zip(content, direct.token_logprobs):
        assert len(token.top_logprobs) == 3
        tops = [t.logprob for t in token.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert tops == pytest.approx([a.logprob for a in position.top], abs=1e-6)
        if position.sampled.token_id in [a.token_id for a in position.top]:
            same = [t for t in token.top_logprobs if t.token == token.token]
            assert any(t.logprob == token.logprob for t in same)
        assert token.bytes == list(token.token.encode())


@pytest.mark.parametrize(
    "penalties",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"frequency_penalty": -2.0},
        {"presence_penalty": 0.5, "frequency_penalty": 1.0},
    ],
)
def test_penalties_follow_openais_formula(client, reference, penalties):
    model, tok, prompt = reference
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    plain = client.chat.completions.create(**kw).choices[0].message.content
    served = client.chat.completions.create(**kw, **penalties).choices[0].message.content
    expected = openai_greedy(
        model,
        prompt,
        10,
        penalties.get("presence_penalty", 0.0),
        penalties.get("frequency_penalty", 0.0),
    )
    assert served == tok.decode(expected, skip_special_tokens=True)
    if penalties == {"frequency_penalty": -2.0}:
        assert expected == [expected[0]] * 10  # the tiny model's logits span less than 2
    else:
        assert served != plain
    if penalties == {"presence_penalty": 2.0}:
        assert len(set(expected)) == 10


def test_logit_bias_bans_and_forces(client, reference):
    model, tok, prompt = reference
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    greedy = openai_greedy(model, prompt, 6)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    assert plain == tok.decode(greedy, skip_special_tokens=True)
    banned = client.chat.completions.create(**kw, logit_bias={str(greedy[0]): -100})
    expected = openai_greedy(model, prompt, 6, bias={greedy[0]: -100.0})
    assert expected[0] != greedy[0] and greedy[0] not in expected
    assert banned.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    (forced_id,) = tok(" yes", add_special_tokens=False)["input_ids"]
    forced = client.chat.completions.create(
        **{**kw, "temperature": 1.0}, seed=1, logit_bias={str(forced_id): 100}
    )
    assert forced.choices[0].message.content == " yes" * 6


def test_max_completion_tokens_bounds_the_length(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens <= 3
    if reply.usage.completion_tokens == 3:
        assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=17)
    assert err.value.param == "max_completion_tokens"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {}},
                }
            },
            "response_format",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        (
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            "modalities",
        ),
        ({"web_search_options": {}}, "web_search_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        ({"temperature": 2.5}, "temperature"),
        ({"logit_bias": {"10000000": 5}}, "logit_bias"),  # not in the policy's vocabulary
        ({"n": 5}, "n"),  # more than this policy's max_n
    ],
)
def test_refusals_are_400_naming_the_param(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            **{"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}
        )
    assert err.value.status_code == 400
    assert (err.value.param, err.value.type) == (param, "invalid_request_error")
    assert isinstance(err.value.body, dict) and err.value.body["message"]


def test_unknown_model_is_not_found(client, policy):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert client.models.retrieve(policy.model_name).id == policy.model_name
    assert [m.id for m in client.models.list()] == [policy.model_name]


def test_wrong_key_is_an_authentication_error(chat_gateway):
    wrong = openai.OpenAI(base_url=f"{chat_gateway.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="policy", messages=MESSAGES)
    assert err.value.code == "invalid_api_key"


def test_hosting_fields_are_accepted(client, chat_gateway):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        store=True,
        metadata={"team": "search"},
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="u-hash",
        reasoning_effort="low",
        verbosity="low",
        parallel_tool_calls=False,
        user="end-user-1",
        tool_choice="none",
        response_format={"type": "text"},
        modalities=["text"],
    )
    assert reply.choices[0].message.content is not None
    log = chat_gateway.log_file.read_text()
    assert "ignored OpenAI fields" in log and "prompt_cache_key" in log
    assert "end-user-1" in log and reply.id in log  # `user` is logged with the response id


def test_legacy_completions(client):
    reply = client.completions.create(
        model="policy", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2
    )
    (choice,) = reply.choices
    assert reply.object == "text_completion" and choice.text is not None
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens <= 5
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    streamed = client.completions.create(
        model="policy",
        prompt="Once upon a time",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_curl_sees_the_raw_sse_framing(chat_gateway):
    body = {
        "messages": MESSAGES,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "-D",
            "-",
            f"{chat_gateway.url}/v1/chat/completions",
            "-H",
            f"Authorization: Bearer {chat_gateway.api_key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    head, _, raw = done.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert raw.endswith("data: [DONE]\n\n"), raw
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
