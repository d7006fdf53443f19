"""HTTP routes of the gateway's own API (feedback, preferences, rankings, health, metrics):
transport only. Schemas are in `protocol`, the conversion to Kafka records in `events`. The
OpenAI-compatible routes are in `openai_router`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.prompts import render_prompt
from services.gateway.auth import ApiKey, authenticate
from services.gateway.events import Event, feedback_event, preference_event, ranking_event
from services.gateway.protocol import (
    Accepted,
    AnnotationQueueResponse,
    FeedbackRequest,
    PreferenceRequest,
    QueuedCandidate,
    RankingRequest,
)
from services.gateway.publisher import PublishUnavailable

Caller = Annotated[ApiKey, Depends(authenticate)]

_ERRORS = {
    401: {"description": "Missing or invalid API key."},
    429: {"description": "Rate limit of this API key exceeded; see Retry-After."},
}
_EVENT_ERRORS = {
    **_ERRORS,
    503: {
        "description": "Kafka did not acknowledge in time; retry with "
        "the same idempotency key after Retry-After."
    },
}

api = APIRouter(prefix="/v1")
ops = APIRouter()
bench = APIRouter(prefix="/v1/bench")


async def _accept(
    request: Request, kind: str, event: Event, caller: ApiKey, key: str | None
) -> Accepted:
    state = request.app.state
    scope_key = f"{caller.key_id}:{kind}:{key}" if key is not None else None

    async def write() -> str:
        await state.publisher.publish(event)
        return event.event_id

    try:
        event_id, duplicate = await state.recent.once(scope_key, write)
    except PublishUnavailable as exc:
        state.metrics.events_unavailable.labels(kind).inc()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="event store unavailable, nothing stored; retry",
            headers={"Retry-After": str(max(1, round(state.settings.publish_timeout_s)))},
        ) from exc
    (state.metrics.events_duplicate if duplicate else state.metrics.events_accepted).labels(
        kind
    ).inc()
    return Accepted(
        id=event_id, duplicate=duplicate, records=0 if duplicate else len(event.records)
    )


@api.post(
    "/feedback",
    status_code=202,
    response_model=Accepted,
    responses=_EVENT_ERRORS,
    summary="Thumbs up/down or a 1-5 rating of one response",
)
async def post_feedback(body: FeedbackRequest, request: Request, caller: Caller) -> Accepted:
    accepted = await _accept(
        request, "feedback", feedback_event(body, caller), caller, body.idempotency_key
    )
    if not accepted.duplicate:
        request.app.state.metrics.feedback.labels(body.thumb or str(body.rating)).inc()
    return accepted


@api.post(
    "/preferences",
    status_code=202,
    response_model=Accepted,
    responses=_EVENT_ERRORS,
    summary="A chosen/rejected pair for one prompt",
)
async def post_preference(body: PreferenceRequest, request: Request, caller: Caller) -> Accepted:
    accepted = await _accept(
        request, "preference", preference_event(body, caller), caller, body.idempotency_key
    )
    _answered(request, body.candidate_id)
    return accepted


@api.post(
    "/rankings",
    status_code=202,
    response_model=Accepted,
    responses=_EVENT_ERRORS,
    summary="K responses to one prompt, best first: stored as K(K-1)/2 pairs",
)
async def post_ranking(body: RankingRequest, request: Request, caller: Caller) -> Accepted:
    accepted = await _accept(
        request, "ranking", ranking_event(body, caller), caller, body.idempotency_key
    )
    _answered(request, body.candidate_id)
    return accepted


def _answered(request: Request, candidate_id: str | None) -> None:
    """This replica drops the candidate at once; the others learn it from the preferences."""
    if candidate_id is not None:
        request.app.state.annotation_queue.answer([candidate_id])


@api.get(
    "/annotation-queue",
    response_model=AnnotationQueueResponse,
    responses=_ERRORS,
    summary="Answers the reward model is least sure how to order, highest disagreement first",
)
async def annotation_queue(
    request: Request,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=100, description="Candidates to return.")] = 10,
) -> AnnotationQueueResponse:
    queue = request.app.state.annotation_queue
    return AnnotationQueueResponse(
        candidates=[
            QueuedCandidate(
                candidate_id=c.candidate_id,
                prompt=c.prompt_text or render_prompt(c.prompt),
                responses=list(c.responses),
                response_ids=list(c.response_ids),
                disagreement=c.disagreement,
                reason=c.reason,
                reward_model_version=c.reward_model_version,
            )
            for c in queue.top(limit)
        ],
        queued=len(queue),
    )


@bench.post(
    "/noop",
    status_code=202,
    response_model=Accepted,
    responses=_ERRORS,
    summary="Benchmark baseline: feedback's auth and validation, no Kafka write",
)
async def noop(body: FeedbackRequest, caller: Caller) -> Accepted:
    return Accepted(id="noop", duplicate=False, records=0)


@ops.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _tcp_reachable(host_port: str, timeout_s: float) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


@ops.get(
    "/readyz",
    summary="Kafka and the policy are reachable",
    responses={503: {"description": "Kafka or the policy is not reachable."}},
)
async def readyz(request: Request, response: Response) -> dict[str, bool]:
    state = request.app.state
    kafka_ok = any(
        await asyncio.gather(*(_tcp_reachable(s, 1.0) for s in state.settings.kafka.servers))
    )
    policy_ok = await state.policy.ready()
    if not (kafka_ok and policy_ok):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"kafka": kafka_ok, "policy": policy_ok}


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@ops.get("/ui/config", summary="Settings the chat page reads")
async def ui_config(request: Request) -> dict[str, str | None]:
    dev_key = request.app.state.settings.ui_dev_api_key
    return {"dev_api_key": dev_key.get_secret_value() if dev_key else None}
