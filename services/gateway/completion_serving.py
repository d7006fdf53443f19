"""Legacy text completions (`/v1/completions`) served by the policy over gRPC: each prompt is
sent as plain text (no chat template), the same sampling fields as chat apply, and `logprobs`
is the number of alternatives per position (0 to 5)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.gateway.openai_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from services.gateway.serving import (
    DONE,
    PolicyClient,
    finish_reason,
    generate,
    legacy_logprobs,
    log_user,
    policy_error,
    response_tail,
    sampling_params,
    sse,
    start_stream,
    stream_end,
    stream_head,
)
from services.genproto.rlhf.v1 import common_pb2, policy_pb2


def to_completion(
    reply: policy_pb2.GenerateResponse, request: CompletionRequest
) -> CompletionResponse:
    """Choices in OpenAI's order: prompt-major, choice `index` = prompt * n + sample."""
    samples = [s for completion in reply.completions for s in completion.samples]
    choices = [
        CompletionChoice(
            index=i,
            text=s.text,
            finish_reason=finish_reason(s.finish_reason),
            logprobs=CompletionLogprobs(**legacy_logprobs(s.token_logprobs))
            if request.logprobs is not None
            else None,
            response_id=s.response_id,
        )
        for i, s in enumerate(samples)
    ]
    return CompletionResponse(
        id=choices[0].response_id, choices=choices, **response_tail(reply, request.model, samples)
    )


async def complete(
    client: PolicyClient, request: CompletionRequest, model: str, limit: int
) -> CompletionResponse:
    message = policy_pb2.GenerateRequest(
        model=model,
        prompts=[common_pb2.Prompt(text=p) for p in request.prompts],
        sampling=sampling_params(request, limit),
    )
    return to_completion(await generate(client, message, request), request)


async def open_stream(
    client: PolicyClient, request: CompletionRequest, model: str, served: str, limit: int
) -> AsyncIterator[bytes]:
    message = policy_pb2.GenerateStreamRequest(
        model=model,
        prompt=common_pb2.Prompt(text=request.prompts[0]),
        sampling=sampling_params(request, limit),
    )
    call, first = await start_stream(client, message, request)
    return stream_chunks(call, first, request, served)


async def stream_chunks(
    call, first: policy_pb2.GenerateStreamResponse, request: CompletionRequest, model: str
) -> AsyncIterator[bytes]:
    """`text_completion` events (the same object as the unary answer, one choice each), the
    usage chunk when asked, then `data: [DONE]`."""
    head = stream_head(first, "text_completion", model, request)
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
    for end in stream_end(head, request, prompt_tokens, completion_tokens):
        yield end
