"""Chat completions served by the policy over gRPC (grpc.aio: no thread blocks on a generation).

Conversion between OpenAI's schema and the policy's messages happens here and only here:
`to_generate_request` builds the gRPC request, `to_completion` and `stream_chunks` build the
HTTP answers. gRPC errors become HTTP errors through `GRPC_TO_HTTP`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import grpc
from fastapi import HTTPException
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ModelCard,
    ModelList,
    Usage,
)
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "abort",
}

GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class PolicyClient:
    """One grpc.aio channel to PolicyService, with its health service for /readyz."""

    def __init__(self, url: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(url)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            reply = await self.health.Check(
                health_pb2.HealthCheckRequest(service="rlhf.v1.PolicyService"), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


def http_error(error: grpc.aio.AioRpcError) -> HTTPException:
    code = GRPC_TO_HTTP.get(error.code(), 502)
    headers = {"Retry-After": "1"} if code == 503 else None
    return HTTPException(
        code, detail=f"policy: {error.code().name}: {error.details()}", headers=headers
    )


def sampling_params(
    request: ChatCompletionRequest, max_new_tokens_limit: int
) -> policy_pb2.SamplingParams:
    max_tokens = request.max_tokens or max_new_tokens_limit
    if max_tokens > max_new_tokens_limit:
        raise HTTPException(
            422,
            detail=[
                {
                    "loc": ["body", "max_tokens"],
                    "type": "less_than_equal",
                    "msg": f"max_tokens may be at most {max_new_tokens_limit} on this gateway",
                }
            ],
        )
    return policy_pb2.SamplingParams(
        n=request.n,
        max_new_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop_list,
        seed=request.seed or 0,
        has_seed=request.seed is not None,
    )


def to_prompt(request: ChatCompletionRequest) -> common_pb2.Prompt:
    messages = [common_pb2.ChatMessage(role=m.role, content=m.content) for m in request.messages]
    return common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=messages))


def to_generate_request(request: ChatCompletionRequest, limit: int) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        prompts=[to_prompt(request)], sampling=sampling_params(request, limit)
    )


def to_completion(reply: policy_pb2.GenerateResponse) -> ChatCompletionResponse:
    completion = reply.completions[0]
    samples = list(completion.samples)
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(content=s.text),
            finish_reason=FINISH_REASONS.get(s.finish_reason),
            response_id=s.response_id,
        )
        for i, s in enumerate(samples)
    ]
    generated = sum(len(s.token_ids) for s in samples)
    prompt_tokens = len(completion.prompt_token_ids)
    return ChatCompletionResponse(
        id=samples[0].response_id,
        created=int(time.time()),
        model=reply.model or "policy",
        choices=choices,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            total_tokens=prompt_tokens + generated,
        ),
        system_fingerprint=f"weights-v{reply.weights_version}",
    )


async def complete(
    client: PolicyClient, request: ChatCompletionRequest, limit: int
) -> ChatCompletionResponse:
    message = to_generate_request(request, limit)
    try:
        reply = await client.stub.Generate(message, timeout=client.timeout_s)
    except grpc.aio.AioRpcError as error:
        raise http_error(error) from error
    if not reply.completions or not reply.completions[0].samples:
        raise HTTPException(502, detail="policy returned no sample")
    return to_completion(reply)


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def open_stream(
    client: PolicyClient, request: ChatCompletionRequest, limit: int
) -> AsyncIterator[bytes]:
    """Starts the gRPC stream and waits for its first chunk, so that a policy error is still an
    HTTP status; returns the SSE body iterator."""
    message = policy_pb2.GenerateStreamRequest(
        prompt=to_prompt(request), sampling=sampling_params(request, limit)
    )
    call = client.stub.GenerateStream(message, timeout=client.timeout_s)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise http_error(error) from error
    if first is grpc.aio.EOF:
        raise HTTPException(502, detail="policy stream ended before its first chunk")
    return stream_chunks(call, first, request.model)


async def stream_chunks(
    call, first: policy_pb2.GenerateStreamResponse, model: str
) -> AsyncIterator[bytes]:
    """OpenAI `chat.completion.chunk` events, then `data: [DONE]`; errors end the stream with an
    `error` event (the status line is already sent)."""
    created = int(time.time())
    response_id = first.response_id
    head = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": f"weights-v{first.weights_version}",
    }
    yield _sse(
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    )
    chunk = first
    try:
        while chunk is not grpc.aio.EOF:
            finish = FINISH_REASONS.get(chunk.finish_reason)
            if chunk.text_delta or finish:
                delta = {"content": chunk.text_delta} if chunk.text_delta else {}
                yield _sse(
                    {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                )
            chunk = await call.read()
    except grpc.aio.AioRpcError as error:
        yield _sse({"error": {"code": error.code().name, "message": error.details()}})
    finally:
        call.cancel()  # a client that went away stops the generation
    yield b"data: [DONE]\n\n"


async def list_models(client: PolicyClient) -> ModelList:
    try:
        info = await client.stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=5.0)
    except grpc.aio.AioRpcError as error:
        raise http_error(error) from error
    return ModelList(
        data=[
            ModelCard(
                id=info.model or "policy",
                created=int(time.time()),
                weights_version=info.weights_version,
            )
        ]
    )
