"""HTTP routes of the OpenAI-compatible API: transport only. Schemas are in `openai_protocol`,
the policy calls in `chat_serving` / `completion_serving`, what both share in `serving`. Every
error of these routes is OpenAI's error object (`openai_errors.OpenAIRoute`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from services.gateway import best_of, chat_serving, completion_serving, serving
from services.gateway.auth import ApiKey, authenticate
from services.gateway.openai_errors import OpenAIRoute, register_fields
from services.gateway.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

register_fields(ChatCompletionRequest, CompletionRequest)

Caller = Annotated[ApiKey, Depends(authenticate)]


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


ERRORS = {
    400: _error("Invalid or unsupported request; `error.param` names the field."),
    401: _error("Missing or invalid API key."),
    404: _error("Unknown model (`error.code` is `model_not_found`)."),
    429: _error("Rate limit of this API key exceeded; see Retry-After."),
    500: _error("A fault in the gateway."),
    502: _error("The policy answered something unexpected."),
    503: _error("The policy is unavailable or overloaded; see Retry-After."),
    504: _error("The policy did not answer in time."),
}
STREAMED = {
    "content": {"text/event-stream": {}},
    "description": "The answer, or server-sent chunks then `data: [DONE]` when `stream` is true.",
}

openai_api = APIRouter(prefix="/v1", route_class=OpenAIRoute, tags=["OpenAI-compatible"])


@openai_api.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, 200: STREAMED},
    summary="OpenAI chat completions from the policy (stream: true -> server-sent events)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Caller):
    reward = request.app.state.reward
    return await _serve(
        body, request, chat_serving, lambda: best_of.check_best_of(body, reward), reward=reward
    )


@openai_api.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERRORS, 200: STREAMED},
    summary="OpenAI legacy text completions: the prompt as is, no chat template",
)
async def completions(body: CompletionRequest, request: Request, caller: Caller):
    return await _serve(body, request, completion_serving)


async def _serve(
    body: ChatCompletionRequest | CompletionRequest,
    request: Request,
    endpoint,
    check: Callable[[], None] = lambda: None,
    **options,
):
    """Both generation routes: the checks of `serving` in their order (refusals, the route's
    own `check`, the length limit, the model), then `endpoint`'s stream or unary answer
    (`options` go to its `complete`)."""
    state = request.app.state
    limit = state.settings.max_new_tokens_limit
    serving.check_request(body)
    check()
    serving.sampling_params(body, limit)  # 400 for a max_tokens above the limit, first
    model, served = await state.models.resolve(body.model)
    if body.stream:
        return _sse(await endpoint.open_stream(state.policy, body, model, served, limit))
    completion = await endpoint.complete(state.policy, body, model, limit, **options)
    serving.log_user(body, completion.id)
    return completion


def _sse(chunks) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@openai_api.get("/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request, caller: Caller) -> ModelList:
    return await request.app.state.models.cards()


@openai_api.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
async def model(model: str, request: Request, caller: Caller) -> ModelCard:
    cards = await request.app.state.models.cards()
    await request.app.state.models.resolve(model)  # 404 model_not_found
    return cards.data[0]


def drop_validation_responses(openapi: dict) -> dict:
    """FastAPI documents a 422 for every route with a body; the OpenAI routes answer 400."""
    paths = {route.path for route in openai_api.routes}
    for path, operations in openapi.get("paths", {}).items():
        if path in paths:
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
    return openapi
