"""The gRPC server every model service runs: health and reflection on, message size limits, a
bounded number of concurrent RPCs (beyond it, RESOURCE_EXHAUSTED at once instead of an unbounded
pile-up), per-method metrics, a readiness gate (while `set_serving(False)`: NOT_SERVING, and
calls fail fast with UNAVAILABLE), and graceful shutdown on SIGTERM (NOT_SERVING, finish
in-flight, stop).

    server = ModelServer("policy", settings, registry)
    server.add(policy_pb2_grpc.add_PolicyServiceServicer_to_server, servicer, "rlhf.v1.PolicyService")
    server.start(); server.wait()
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.control_auth import ControlAuthInterceptor
from services.common.metrics import RpcMetrics
from services.common.rpc import gate_handler, wrap_handler

log = logging.getLogger(__name__)


class GrpcSettings(BaseSettings):
    """Server knobs shared by the gRPC services, nested in each model service's settings and read
    there from `RLHF_<SVC>_GRPC_<FIELD>` (services.common.settings.ModelServiceSettings)."""

    # A prefix of its own, so that a bare HOST or PORT in the environment is never read.
    model_config = SettingsConfigDict(env_prefix="RLHF_GRPC_", extra="ignore")

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Prometheus /metrics port; 0 disables."
    )
    max_workers: int = Field(32, ge=1, description="Threads handling RPCs.")
    max_concurrent_rpcs: int = Field(
        64, ge=1, description="RPCs admitted at once; more get RESOURCE_EXHAUSTED immediately."
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=4 * 1024 * 1024, description="Largest request or response message."
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="Time in-flight RPCs get on SIGTERM.")
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="Connections are closed (gracefully) after this age, so that clients resolve "
        "a headless Service again and reach replicas added since; 0 keeps them forever.",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the server: set with the key, TLS is on."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of the server.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle of the clients: set, every client must present a certificate "
        "it signed (mutual TLS).",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> GrpcSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (or mutual TLS) credentials, or None for a plaintext port."""
        if self.tls_cert_file is None:
            return None
        client_ca = self.tls_client_ca_file.read_bytes() if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    @classmethod
    def read(cls, prefix: str, **defaults: object) -> GrpcSettings:
        """The block read from `<prefix><FIELD>` variables (`RLHF_REWARD_GRPC_PORT`); `defaults`
        fill the fields no variable sets (a service's own ports)."""
        block = cls(_env_prefix=prefix)
        unset = {k: v for k, v in defaults.items() if k not in block.model_fields_set}
        return block.model_copy(update=unset)


def message_size_options(limit: int) -> list[tuple[str, int]]:
    """Channel/server options that raise gRPC's 4 MiB default on both directions."""
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def connection_age_options(age_s: float) -> list[tuple[str, int]]:
    """Server options that retire connections after `age_s` (a call in flight gets 60 s more)."""
    if age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", 60_000),
    ]


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code and times it."""

    def __init__(self, metrics: RpcMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        m = self.metrics

        def finish(context, start: float, error: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if error else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            m.requests.labels(method, name).inc()
            m.latency.labels(method).observe(time.perf_counter() - start)
            m.in_flight.dec()

        def measured(behavior, streaming: bool):
            def unary(request, context):
                start = time.perf_counter()
                m.in_flight.inc()
                error = True
                try:
                    response = behavior(request, context)
                    error = False
                    return response
                finally:
                    finish(context, start, error)

            def stream(request, context):
                start = time.perf_counter()
                m.in_flight.inc()
                error = True
                try:
                    yield from behavior(request, context)
                    error = False
                finally:
                    finish(context, start, error)

            return stream if streaming else unary

        return wrap_handler(continuation(handler_call_details), measured)


class ReadinessInterceptor(grpc.ServerInterceptor):
    """While the server is not ready (its model is down), every call of its own services fails at
    once with UNAVAILABLE, so that callers try another replica instead of waiting on a dead
    model; health and reflection always answer."""

    def __init__(self, ready: threading.Event, always: tuple[str, ...]):
        self.ready = ready
        self.always = always

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler_call_details.method.lstrip("/").startswith(self.always):
            return handler
        ready = self.ready

        def check(context) -> None:
            if not ready.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, "the model is not ready (Triton down)")

        return gate_handler(handler, check)


class ModelServer:
    """Lifecycle of one gRPC service process: add servicers, start, serve, drain, stop."""

    def __init__(
        self,
        service: str,
        settings: GrpcSettings,
        registry: CollectorRegistry | None = None,
        control_methods: tuple[str, ...] = (),
    ):
        """`control_methods` (full names) take only callers with the control token
        (services/common/control_auth.py)."""
        self.service = service
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = RpcMetrics(service, self.registry)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self._stopped = threading.Event()
        self.ready = threading.Event()
        """Set while the service can answer (`set_serving`); cleared, calls get UNAVAILABLE."""
        always = ("grpc.health.", "grpc.reflection.")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.max_workers, thread_name_prefix=service
            ),
            interceptors=[
                MetricsInterceptor(self.metrics),
                ControlAuthInterceptor(control_methods),
                ReadinessInterceptor(self.ready, always),
            ],
            options=[
                *message_size_options(settings.max_message_bytes),
                *connection_age_options(settings.max_connection_age_s),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port: int | None = None
        self.metrics_port: int | None = None

    def add(self, register: Callable, servicer, full_service_name: str) -> None:
        register(servicer, self.server)
        self._service_names.append(full_service_name)

    def start(self) -> int:
        reflection.enable_server_reflection(self._service_names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = self.settings.server_credentials()
        self.port = (
            self.server.add_secure_port(address, credentials)
            if credentials is not None
            else self.server.add_insecure_port(address)
        )
        self.server.start()
        if self.settings.metrics_port:
            from services.common.metrics import serve_metrics

            httpd, _ = serve_metrics(self.registry, self.settings.metrics_port)
            self.metrics_port = httpd.server_port
        self.set_serving(True)
        log.info("serving", extra={"fields": {"port": self.port, "services": self._service_names}})
        return self.port

    def set_serving(self, serving: bool) -> None:
        """Health SERVING and calls admitted, or NOT_SERVING and calls refused (UNAVAILABLE)."""
        if serving:
            self.ready.set()
        else:
            self.ready.clear()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            self.health.set(name, status)

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING first (load balancers drain), then let in-flight RPCs finish."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.server.stop(grace).wait()
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            log.info("shutting down", extra={"fields": {"signal": signum}})
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait(self) -> None:
        self._stopped.wait()
