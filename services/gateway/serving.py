"""What the OpenAI-compatible endpoints share: the policy's gRPC client (grpc.aio: no thread
blocks on a generation), the served model names, the conversion of OpenAI's sampling fields to
the policy's SamplingParams (in one place), and policy errors as OpenAI errors.

    1. refuse what the policy cannot do (400, `param` names the field); warn about ignored fields
    2. resolve `model` (a name /v1/models lists, or an alias; else 404 model_not_found)
    3. SamplingParams from the request (`sampling_params`)
    4. call the policy; a gRPC error becomes an OpenAI error (`policy_error`)
"""

from __future__ import annotations

import json
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import replica_aio_channel
from services.gateway.openai_errors import OpenAIError
from services.gateway.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "abort",
}

GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

POLICY_PARAMS = {
    "model": "model",
    "sampling.n": "n",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.logit_bias": "logit_bias",
    "sampling.top_logprobs": "top_logprobs",
}
"""The policy's INVALID_ARGUMENT field prefixes, as the request parameter they came from."""

TOP_P_ZERO = 1e-9
"""OpenAI's top_p 0 keeps only the most likely token; the policy reads 0 as 1, so 0 is sent as
this mass, which the best token alone always reaches."""


class PolicyClient:
    """One grpc.aio channel to every PolicyService replica behind `url` (a name gRPC re-resolves,
    e.g. the headless Service, or a comma-separated list): calls go round robin, one refused
    with UNAVAILABLE is retried on another replica, TLS when RLHF_GRPC_CLIENT_TLS_* say so
    (services/common/channels.py); with its health service for /readyz."""

    def __init__(self, url: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.channel = replica_aio_channel(url, ["rlhf.v1.PolicyService"])
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

    async def model_info(self) -> policy_pb2.GetModelInfoResponse:
        try:
            return await self.stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as error:
            raise policy_error(error) from error

    async def close(self) -> None:
        await self.channel.close()


class ServedModels:
    """The names a request may give as `model`: the policy's own (GetModelInfo, cached and
    asked again on a miss, so a renamed policy is seen) and the configured aliases."""

    def __init__(self, client: PolicyClient, aliases: list[str]):
        self.client, self.aliases = client, set(aliases)
        self._name: str | None = None

    async def resolve(self, model: str) -> tuple[str, str]:
        """(GenerateRequest.model to send, the served name to answer with): an alias sends ""
        (whatever policy is served), a name must be the policy's own, else 404."""
        if model in self.aliases:
            if self._name is None:
                self._name = (await self.client.model_info()).model
            return "", self._name
        if model != self._name:
            self._name = (await self.client.model_info()).model
        if model != self._name:
            raise OpenAIError(
                404,
                f"The model {model!r} does not exist; this gateway serves {self._name!r}",
                param="model",
                code="model_not_found",
            )
        return model, model

    async def cards(self) -> ModelList:
        info = await self.client.model_info()
        self._name = info.model
        card = ModelCard(
            id=info.model, created=int(time.time()), weights_version=info.weights_version
        )
        return ModelList(data=[card])


def policy_error(error: grpc.aio.AioRpcError, request: SamplingFields | None = None) -> OpenAIError:
    status = GRPC_TO_HTTP.get(error.code(), 502)
    details = error.details() or ""
    param = None
    if status == 400:
        field = details.partition(":")[0]
        param = POLICY_PARAMS.get(field)
        if field == "sampling.max_new_tokens" and request is not None:
            param = request.max_new_tokens[0]
        elif field.startswith("prompt") and request is not None:
            # "prompts[0].messages[1].content" -> "messages[1].content"
            inner = field.partition(".")[2]
            param = inner or ("prompt" if isinstance(request, CompletionRequest) else "messages")
    code = None
    if param == "model":  # renamed between our check and the call
        status, code = 404, "model_not_found"
    headers = {"Retry-After": "1"} if status == 503 else None
    message = f"policy: {error.code().name}: {details}"
    return OpenAIError(status, message, param, code=code, headers=headers)


def check_request(request: ChatCompletionRequest | CompletionRequest) -> None:
    """1. Refuses what the policy cannot do; logs a warning naming the ignored fields."""
    refusals = request.refusals()
    if refusals:
        param, why = refusals[0]
        raise OpenAIError(400, why, param, code="unsupported_parameter")
    ignored = request.ignored()
    if ignored:
        log.warning(
            "ignored OpenAI fields (they concern OpenAI's hosting only)",
            extra={"fields": {"ignored": ignored, "user": request.user}},
        )


def log_user(request: SamplingFields, response_id: str) -> None:
    """OpenAI's `user`: the end user, logged with the response id they were served (abuse
    monitoring can join it with the feedback on that id)."""
    if request.user:
        log.info(
            "OpenAI end user served",
            extra={"fields": {"user": request.user, "response_id": response_id}},
        )


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, max_new_tokens_limit: int
) -> policy_pb2.SamplingParams:
    """3. OpenAI's sampling fields as the policy's SamplingParams."""
    field, max_tokens = request.max_new_tokens
    max_tokens = max_tokens or max_new_tokens_limit
    if max_tokens > max_new_tokens_limit:
        raise OpenAIError(
            400, f"{field} may be at most {max_new_tokens_limit} on this gateway", field
        )
    if isinstance(request, ChatCompletionRequest):
        top_logprobs, token_logprobs = (request.top_logprobs or 0), bool(request.logprobs)
    else:
        top_logprobs, token_logprobs = (request.logprobs or 0), request.logprobs is not None
    top_p = 1.0 if request.top_p is None else request.top_p
    seed = request.seed
    return policy_pb2.SamplingParams(
        n=request.n or 1,
        max_new_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=top_p if top_p > 0 else TOP_P_ZERO,
        stop=request.stop_list,
        seed=0 if seed is None else seed & 0xFFFF_FFFF_FFFF_FFFF,
        has_seed=seed is not None,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias={int(t): float(b) for t, b in (request.logit_bias or {}).items()},
        top_logprobs=top_logprobs,
        token_logprobs=token_logprobs,
    )


async def generate(
    client: PolicyClient,
    message: policy_pb2.GenerateRequest,
    request: ChatCompletionRequest | CompletionRequest,
) -> policy_pb2.GenerateResponse:
    """4. The unary Generate call of both endpoints: a gRPC error is an OpenAI error, and a
    reply without a single sample is a 502 (the policy broke its contract)."""
    try:
        reply = await client.stub.Generate(message, timeout=client.timeout_s)
    except grpc.aio.AioRpcError as error:
        raise policy_error(error, request) from error
    if not any(c.samples for c in reply.completions):
        raise OpenAIError(502, "policy returned no sample")
    return reply


async def start_stream(
    client: PolicyClient,
    message: policy_pb2.GenerateStreamRequest,
    request: ChatCompletionRequest | CompletionRequest,
):
    """4. Starts the GenerateStream call and waits for its first chunk, so that a policy error
    is still an HTTP status; returns (call, first chunk)."""
    call = client.stub.GenerateStream(message, timeout=client.timeout_s)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise policy_error(error, request) from error
    if first is grpc.aio.EOF:
        raise OpenAIError(502, "policy stream ended before its first chunk")
    return call, first


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def fingerprint(weights_version: int) -> str:
    """`system_fingerprint`: the policy weights that answered."""
    return f"weights-v{weights_version}"


def response_tail(
    reply: policy_pb2.GenerateResponse, requested_model: str, samples
) -> dict[str, object]:
    """What a unary answer of either endpoint carries besides its choices: `created`, `model`
    (the policy's name, or the one asked for), `usage` over every completion's prompt and the
    given `samples`, and `system_fingerprint`."""
    prompt_tokens = sum(len(c.prompt_token_ids) for c in reply.completions)
    return {
        "created": int(time.time()),
        "model": reply.model or requested_model,
        "usage": usage(prompt_tokens, sum(len(s.token_ids) for s in samples)),
        "system_fingerprint": fingerprint(reply.weights_version),
    }


def stream_head(
    first: policy_pb2.GenerateStreamResponse,
    kind: str,
    model: str,
    request: ChatCompletionRequest | CompletionRequest,
) -> dict[str, object]:
    """The fields every streamed chunk of either endpoint repeats (`object` is `kind`); with
    `stream_options.include_usage`, `usage: null` until the last chunk."""
    head: dict[str, object] = {
        "id": first.response_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint(first.weights_version),
    }
    if include_usage(request):
        head["usage"] = None
    return head


def include_usage(request: SamplingFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def stream_end(head: dict, request: SamplingFields, prompt_tokens: int, completion_tokens: int):
    """The last events of a stream: the usage chunk (no choices) when asked, then `[DONE]`."""
    if include_usage(request):
        totals = usage(prompt_tokens, completion_tokens).model_dump()
        yield sse({**head, "choices": [], "usage": totals})
    yield DONE


def finish_reason(value: int) -> str | None:
    return FINISH_REASONS.get(value)


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(positions) -> list[dict]:
    """Policy PositionLogprobs as OpenAI's `logprobs.content` entries."""
    return [
        {
            "token": p.sampled.text,
            "logprob": p.sampled.logprob,
            "bytes": token_bytes(p.sampled.text),
            "top_logprobs": [
                {"token": t.text, "logprob": t.logprob, "bytes": token_bytes(t.text)} for t in p.top
            ],
        }
        for p in positions
    ]


def legacy_logprobs(positions, offset: int = 0) -> dict:
    """Policy PositionLogprobs as the legacy completions' `logprobs` object; `text_offset` is
    each token's position in the concatenated token texts, counted from `offset` (the length
    of the token texts before these positions)."""
    tokens = [p.sampled.text for p in positions]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [p.sampled.logprob for p in positions],
        "top_logprobs": [{t.text: t.logprob for t in p.top} for p in positions],
        "text_offset": offsets,
    }
