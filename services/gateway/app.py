"""The gateway: the platform's HTTP front door (FastAPI).

    POST /v1/chat/completions   OpenAI-compatible, calls PolicyService over gRPC (stream: true -> SSE)
    POST /v1/completions        OpenAI's legacy text completions, the same way
    GET  /v1/models[/{model}]   the served policy (errors of these routes: OpenAI's error object)
    POST /v1/feedback           thumbs / 1-5 rating of a response id  -> rlhf.feedback.v1
    POST /v1/preferences        prompt, chosen, rejected              -> rlhf.preferences.v1
    POST /v1/rankings           prompt, K responses best first        -> K(K-1)/2 pairs
    GET  /v1/annotation-queue   what the reward model is least sure of (rlhf.annotation-queue.v1)
    GET  /healthz /readyz /metrics /docs      and the chat page at /

An event is answered 202 only after Kafka acknowledged it (acks=all), else 503 with Retry-After.
Run it (settings in `services/gateway/settings.py`):

    RLHF_GATEWAY_API_KEY_SHA256=<sha256 hex of the key> python -m services.gateway
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry

from services.common.dead_letters import DeadLetters
from services.common.logging import configure_logging
from services.gateway.annotation_queue import AnnotationQueue, QueueTail
from services.gateway.api_router import api, bench, ops
from services.gateway.auth import ApiKeyVerifier, TokenBucket
from services.gateway.best_of import RewardClient
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from services.gateway.openai_router import drop_validation_responses, openai_api
from services.gateway.publisher import EventPublisher, RecentEvents, make_producer
from services.gateway.serving import PolicyClient, ServedModels
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.publisher = EventPublisher(
            lambda: make_producer(settings.kafka), settings.publish_timeout_s
        )
        state.policy = PolicyClient(settings.policy_url, settings.policy_timeout_s)
        state.models = ServedModels(state.policy, settings.model_aliases)
        if settings.reward_url is not None:
            state.reward = RewardClient(settings.reward_url, settings.reward_timeout_s)
        dead_letters = DeadLetters(settings.kafka, "gateway", state.metrics.registry)
        tail = QueueTail(
            settings.kafka, state.annotation_queue, dead_letters, settings.annotation_lookback_s
        )
        tail.start()
        log.info(
            "gateway ready",
            extra={
                "fields": {
                    "kafka": settings.kafka.bootstrap_servers,
                    "policy": settings.policy_url,
                    "reward": settings.reward_url,
                }
            },
        )
        try:
            yield
        finally:
            await asyncio.to_thread(tail.stop)
            dead_letters.close()
            await state.policy.close()
            if state.reward is not None:
                await state.reward.close()
            state.publisher.close(timeout_s=settings.publish_timeout_s)

    app = FastAPI(
        title="RLHF platform gateway",
        version="1.0",
        description="Chat completions from the policy, and human feedback into Kafka.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics(CollectorRegistry())
    app.state.verifier = ApiKeyVerifier(settings.api_key_sha256)
    app.state.rate_limiter = TokenBucket(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.recent = RecentEvents(settings.idempotency_cache_size)
    app.state.reward = None  # a RewardClient when reward_url is set (best_of)
    app.state.annotation_queue = AnnotationQueue(
        settings.annotation_queue_size, settings.annotation_answered_memory
    )

    app.include_router(openai_api)
    app.include_router(api)
    app.include_router(ops)
    if settings.bench_noop_endpoint:
        app.include_router(bench)
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    openapi = app.openapi
    app.openapi = lambda: drop_validation_responses(openapi())
    routes = set(app.openapi()["paths"]) | {"/", "/docs", "/openapi.json"}
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        **settings.uvicorn_tls(),
    )
