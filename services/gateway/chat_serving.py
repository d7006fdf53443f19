"""Chat completions served by the policy over gRPC.

Conversion between OpenAI's chat schema and the policy's messages happens here and only here:
`to_generate_request` builds the gRPC request (sampling in `serving.sampling_params`),
`to_completion` and `stream_chunks` build the HTTP answers. The `id` of a completion is the
policy's response id of its first choice, and every choice carries its own `response_id`: the
handle a product posts feedback with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.gateway import best_of
from services.gateway.openai_errors import OpenAIError
from services.gateway.openai_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    TokenLogprob,
    message_text,
)
from services.gateway.serving import (
    DONE,
    PolicyClient,
    chat_logprobs,
    finish_reason,
    generate,
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
    sampling = sampling_params(request, limit)
    sampling.n = best_of.samples_to_draw(request)
    return policy_pb2.GenerateRequest(model=model, prompts=[to_prompt(request)], sampling=sampling)


def to_completion(
    reply: policy_pb2.GenerateResponse,
    request: ChatCompletionRequest,
    ranked: list[tuple[policy_pb2.Sample, float]] | None = None,
) -> ChatCompletionResponse:
    """The answer; with `ranked` ((sample, reward), best first: best_of) its choices are those,
    else the policy's samples in order. Usage counts every sample the policy drew."""
    samples = list(reply.completions[0].samples)
    chosen = ranked if ranked is not None else [(s, None) for s in samples]
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
            reward=reward,
        )
        for i, (s, reward) in enumerate(chosen)
    ]
    return ChatCompletionResponse(
        id=choices[0].response_id, choices=choices, **response_tail(reply, request.model, samples)
    )


async def complete(
    client: PolicyClient,
    request: ChatCompletionRequest,
    model: str,
    limit: int,
    reward: best_of.RewardClient | None = None,
) -> ChatCompletionResponse:
    """One Generate call; with `best_of`, its samples ranked by `reward` (best_of.py)."""
    message = to_generate_request(request, model, limit)
    try:
        reply = await generate(client, message, request)
    except OpenAIError as error:
        if request.best_of is not None and error.param == "n":  # n was best_of's
            error.param = "best_of"
        raise
    if request.best_of is None:
        return to_completion(reply, request)
    ranked, version = await best_of.rank(
        reward, message.prompts[0], list(reply.completions[0].samples), request.n or 1
    )
    completion = to_completion(reply, request, ranked)
    completion.reward_model_version = version
    return completion


async def open_stream(
    client: PolicyClient, request: ChatCompletionRequest, model: str, served: str, limit: int
) -> AsyncIterator[bytes]:
    """Starts the gRPC stream (a policy error before the first chunk is an HTTP status);
    returns the SSE body iterator."""
    message = policy_pb2.GenerateStreamRequest(
        model=model, prompt=to_prompt(request), sampling=sampling_params(request, limit)
    )
    call, first = await start_stream(client, message, request)
    return stream_chunks(call, first, request, served)


async def stream_chunks(
    call, first: policy_pb2.GenerateStreamResponse, request: ChatCompletionRequest, model: str
) -> AsyncIterator[bytes]:
    """OpenAI `chat.completion.chunk` events: a role chunk per choice, content chunks tagged
    with the choice's `index`, a finish chunk per choice, with `stream_options.include_usage`
    a last chunk with `usage` and no choices, then `data: [DONE]`. Errors end the stream with
    an `error` event (the status line is already sent)."""
    n = request.n or 1
    head = stream_head(first, "chat.completion.chunk", model, request)
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
    for end in stream_end(head, request, prompt_tokens, completion_tokens):
        yield end
