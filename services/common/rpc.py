"""gRPC plumbing the services share: field-naming validation errors, deadlines passed on to
Triton, Triton errors turned into gRPC status codes, and the one way a server interceptor wraps
a method's behaviour (`wrap_handler`).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from tritonclient.utils import InferenceServerException


class FieldError(ValueError):
    """A request field is invalid; becomes INVALID_ARGUMENT with "field: problem"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class Forbidden(Exception):
    """The caller may not ask for this (PERMISSION_DENIED), e.g. a folder outside the allowed root."""


class Aborted(Exception):
    """A conflict the caller may simply retry (ABORTED), e.g. versions changing mid-request."""


class DeadlineTooShort(Exception):
    """The caller's deadline has already passed."""


def remaining_s(context: grpc.ServicerContext, default_s: float) -> float:
    """Seconds the caller still waits (the call's deadline), else the default; at most the default."""
    left = context.time_remaining()
    if left is None:
        return default_s
    if left <= 0.001:
        raise DeadlineTooShort()
    return min(left, default_s)


_THIS_REPLICA_CANNOT_SERVE = (
    None,
    grpc.StatusCode.OK,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    # "Request for unknown model": the caller never names a Triton model, so a missing one means
    # that this replica's Triton lost it (restarted without it, mid-reload). UNAVAILABLE is what
    # callers' retry policy moves to another replica (services/common/channels.py).
    grpc.StatusCode.NOT_FOUND,
)


def status_of(error: InferenceServerException) -> grpc.StatusCode:
    """The gRPC status a Triton error maps to (DEADLINE_EXCEEDED, INVALID_ARGUMENT, ...; a
    missing model or an unclassified failure is UNAVAILABLE)."""
    name = (error.status() or "").rsplit(".", 1)[-1]
    code = grpc.StatusCode.__members__.get(name)
    if code in _THIS_REPLICA_CANNOT_SERVE:
        return grpc.StatusCode.UNAVAILABLE
    return code


def abort_for(context: grpc.ServicerContext, error: Exception, service: str) -> None:
    """Ends the RPC with the status that `error` stands for (raises, as context.abort does)."""
    if isinstance(error, FieldError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, DeadlineTooShort):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the model ran")
    if isinstance(error, Aborted):
        context.abort(grpc.StatusCode.ABORTED, str(error))
    if isinstance(error, Forbidden):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    if isinstance(error, InferenceServerException):
        context.abort(status_of(error), f"{service} model: {error.message()}")
    raise error


Behavior = Callable[..., object]
_KINDS = (
    ("unary_unary", False),
    ("stream_unary", False),
    ("unary_stream", True),
    ("stream_stream", True),
)


def wrap_handler(handler, wrap: Callable[[Behavior, bool], Behavior]):
    """`handler` (a grpc.RpcMethodHandler) with its behaviour replaced by `wrap(behavior,
    streaming)`, where `streaming` is True when the method streams responses (the wrapper must
    then be a generator). None stays None: the method does not exist."""
    if handler is None:
        return None
    for kind, streaming in _KINDS:
        behavior = getattr(handler, kind)
        if behavior:
            return handler._replace(**{kind: wrap(behavior, streaming)})
    return handler


def gate_handler(handler, check: Callable[[grpc.ServicerContext], None]):
    """`handler` with `check(context)` run before its behaviour on every call; `check` ends the
    call by raising (context.abort) when it must not proceed."""

    def gated(behavior: Behavior, streaming: bool) -> Behavior:
        def unary(request, context):
            check(context)
            return behavior(request, context)

        def stream(request, context):
            check(context)
            yield from behavior(request, context)

        return stream if streaming else unary

    return wrap_handler(handler, gated)
