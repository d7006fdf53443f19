"""Legacy text completions (`/v1/completions`) served by the policy over gRPC: each prompt is
sent as plain text (no chat template), the same sampling fields as chat apply, and `logprobs`
is the number of alternatives per position (0 to 5)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from services.gateway.chat_serving import DONE, sse
from services.gateway.openai_errors import OpenAIError
from services.gateway.openai_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from services.gateway.serving import (
    PolicyClient,
    finish_reason,
    legacy_logprobs,
    log_user,
    policy_error,
    sampling_params,
)
from services.genproto.rlhf.v1 import common_pb2, policy_pb2


def to_completion(
    reply: policy_pb2.GenerateResponse, request: CompletionRequest
) -> CompletionResponse:
    """Choices in OpenAI's order: prompt-major, choice `index` = prompt * n + sample."""
    choices, prompt_tokens, generated = [], 0, 0
    for completion in reply.completions:
        prompt_tokens += len(completion.prompt_token_ids)
        for s in completion.samples:
            generated += len(s.token_ids)
            logprobs = None
            if request.logprobs is not None:
                logprobs = CompletionLogprobs(**legacy_logprobs(s.token_logprobs))
            choices.append(
                CompletionChoice(
                    index=len(choices),
                    text=s.text,
                    finish_reason=finish_reason(s.finish_reason),
                    logprobs=logprobs,
                    response_id=s.response_id,
                )
            )
    return CompletionResponse(
        id=choices[0].response_id,
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
    client: PolicyClient, request: CompletionRequest, model: str, limit: int
) -> CompletionResponse:
    message = policy_pb2.GenerateRequest(
        model=model,
        prompts=[common_pb2.Prompt(text=p) for p in request.prompts],
        sampling=sampling_params(request, limit),
    )
    try:
        reply = await client.stub.Generate(message, timeout=client.timeout_s)
    except grpc.aio.AioRpcError as error:
        raise policy_error(error, request) from error
    if not reply.completions or not any(c.samples for c in reply.completions):
        raise OpenAIError(502, "policy returned no sample")
    return to_completion(reply, request)


async def open_stream(
    client: PolicyClient, request: CompletionRequest, model: str, served: str, limit: int
) -> AsyncIterator[bytes]:
    message = policy_pb2.GenerateStreamRequest(
        model=model,
        prompt=common_pb2.Prompt(text=request.prompts[0]),
        sampling=sampling_params(request, limit),
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
    call, first: policy_pb2.GenerateStreamResponse, request: CompletionRequest, model: str
) -> AsyncIterator[bytes]:
    """`text_completion` events (the same object as the unary answer, one choice each), the
    usage chunk when asked, then `data: [DONE]`."""
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    head = {
        "id": first.response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"weights-v{first.weights_version}",
    }
    if include_usage:
        head["usage"] = None
    offsets: dict[int, int] = {}  # characters of token text so far, by choice
    log_user(request, first.response_id)
    completion_tokens, prompt_tokens = 0, first.prompt_tokens
    chunk = first
    try:
        while chunk is not grpc.aio.EOF:
            j = chunk.sample_index
            completion_tokens += len(chunk.token_ids)
            finish = finish_reason(chunk.finish_reason)
            logprobs = None
            if request.logprobs is not None and chunk.token_logprobs:
                logprobs = legacy_logprobs(chunk.token_logprobs, offsets.get(j, 0))
            if chunk.text_delta or logprobs or finish:
                choice = {
                    "index": j,
                    "text": chunk.text_delta,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "response_id": chunk.response_id,
                }
                yield sse({**head, "choices": [choice]})
            offsets[j] = offsets.get(j, 0) + sum(len(p.sampled.text) for p in chunk.token_logprobs)
            chunk = await call.read()
    except grpc.aio.AioRpcError as error:
        yield sse(policy_error(error, request).body())
        yield DONE
        return
    finally:
        call.cancel()
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        yield sse({**head, "choices": [], "usage": usage})
    yield DONE
