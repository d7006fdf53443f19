"""Chat completions served by the policy over gRPC.

Conversion between OpenAI's chat schema and the policy's messages happens here and only here:
`to_generate_request` builds the gRPC request (sampling in `serving.sampling_params`),
`to_completion` and `stream_chunks` build the HTTP answers. The `id` of a completion is the
policy's response id of its first choice, and every choice carries its own `response_id`: the
handle a product posts feedback with.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import grpc

from services.gateway.openai_errors import OpenAIError
from services.gateway.openai_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    TokenLogprob,
    Usage,
    message_text,
)
from services.gateway.serving import (
    PolicyClient,
    chat_logprobs,
    finish_reason,
    log_user,
    policy_error,
    sampling_params,
)
from services.genproto.rlhf.v1 import common_pb2, policy_pb2

ROLES = {"developer": "system"}
"""OpenAI roles the chat template knows by another name."""


def to_prompt(request: ChatCompletionRequest) -> common_pb2.Prompt:
    messages = [
        common_pb2.ChatMessage(role=ROLES.get(m.role, m.role), content=message_text(m))
        for m in request.messages
    ]
    return common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=messages))


def to_generate_request(
    request: ChatCompletionRequest, model: str, limit: int
) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        model=model, prompts=[to_prompt(request)], sampling=sampling_params(request, limit)
    )


def to_completion(
    reply: policy_pb2.GenerateResponse, request: ChatCompletionRequest
) -> ChatCompletionResponse:
    completion = reply.completions[0]
    samples = list(completion.samples)
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(content=s.text),
            finish_reason=finish_reason(s.finish_reason),
            logprobs=ChoiceLogprobs(
                content=[TokenLogprob(**p) for p in chat_logprobs(s.token_logprobs)]
            )
            if request.logprobs
            else None,
            response_id=s.response_id,
        )
        for i, s in enumerate(samples)
    ]
    generated = sum(len(s.token_ids) for s in samples)
    prompt_tokens = len(completion.prompt_token_ids)
    return ChatCompletionResponse(
        id=samples[0].response_id,
        created=int(time.time()),
        model=reply.model or request.model,
        choices=choices,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            total_tokens=prompt_tokens + generated,
        ),
        system_fingerprint=f"weights-v{reply.weights_version}",
    )


async def complete(
    client: PolicyClient, request: ChatCompletionRequest, model: str, limit: int
) -> ChatCompletionResponse:
    message = to_generate_request(request, model, limit)
    try:
        reply = await client.stub.Generate(message, timeout=client.timeout_s)
    except grpc.aio.AioRpcError as error:
        raise policy_error(error, request) from error
    if not reply.completions or not reply.completions[0].samples:
        raise OpenAIError(502, "policy returned no sample")
    return to_completion(reply, request)


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


DONE = b"data: [DONE]\n\n"


async def open_stream(
    client: PolicyClient, request: ChatCompletionRequest, model: str, served: str, limit: int
) -> AsyncIterator[bytes]:
    """Starts the gRPC stream and waits for its first chunk, so that a policy error is still an
    HTTP status; returns the SSE body iterator."""
    message = policy_pb2.GenerateStreamRequest(
        model=model, prompt=to_prompt(request), sampling=sampling_params(request, limit)
    )
    call = client.stub.GenerateStream(message, timeout=client.timeout_s)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise policy_error(error, request) from error
    if first is grpc.aio.EOF:
        raise OpenAIError(502, "policy stream ended before its first chunk")
    return stream_chunks(call, first, request, served)


async def stream_chunks(
    call, first: policy_pb2.GenerateStreamResponse, request: ChatCompletionRequest, model: str
) -> AsyncIterator[bytes]:
    """OpenAI `chat.completion.chunk` events: a role chunk per choice, content chunks tagged
    with the choice's `index`, a finish chunk per choice, with `stream_options.include_usage`
    a last chunk with `usage` and no choices, then `data: [DONE]`. Errors end the stream with
    an `error` event (the status line is already sent)."""
    n = request.n or 1
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    head = {
        "id": first.response_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"weights-v{first.weights_version}",
    }
    if include_usage:
        head["usage"] = None
    ids: dict[int, str] = {first.sample_index: first.response_id}
    log_user(request, first.response_id)
    completion_tokens, prompt_tokens = 0, first.prompt_tokens

    def event(index: int, delta: dict, finish: str | None = None, logprobs=None) -> bytes:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
            "response_id": ids.get(index, ""),
        }
        return sse({**head, "choices": [choice]})

    role_sent: set[int] = set()
    chunk = first
    try:
        while chunk is not grpc.aio.EOF:
            j = chunk.sample_index
            ids.setdefault(j, chunk.response_id)
            if j not in role_sent:
                role_sent.add(j)
                yield event(j, {"role": "assistant", "content": ""})
            completion_tokens += len(chunk.token_ids)
            finish = finish_reason(chunk.finish_reason)
            logprobs = (
                {"content": chat_logprobs(chunk.token_logprobs), "refusal": None}
                if request.logprobs and chunk.token_logprobs
                else None
            )
            if chunk.text_delta or logprobs:
                yield event(j, {"content": chunk.text_delta}, None, logprobs)
            if finish:
                yield event(j, {}, finish)
            chunk = await call.read()
    except grpc.aio.AioRpcError as error:
        yield sse(policy_error(error, request).body())
        yield DONE
        return
    finally:
        call.cancel()  # a client that went away stops the generation
    if len(role_sent) < n:  # only when the policy sent fewer samples than asked
        yield sse(OpenAIError(502, f"policy streamed {len(role_sent)} of {n} choices").body())
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        yield sse({**head, "choices": [], "usage": usage})
    yield DONE
