"""The control plane's authentication: only callers holding the deployment's control token may
change what a model service serves (`PolicyService.UpdateWeights`, `RewardService.ReloadModel`).

The token is one shared secret (a Kubernetes Secret mounted as a file, `RLHF_CONTROL_TOKEN_FILE`,
or `RLHF_CONTROL_TOKEN`) read by the services and by their callers (the trainer's weight push,
the refresh's reload). Callers send `authorization: Bearer <token>`; the server compares the
sha256 of what it got with the sha256 of its own token in constant time (`hmac.compare_digest`).
A service without a token refuses control calls (PERMISSION_DENIED) unless
`RLHF_CONTROL_ALLOW_UNAUTHENTICATED=true`, so that forgetting the Secret fails closed. The token
is never logged: it is a `SecretStr`, and refusals name the method, never what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

HEADER = "authorization"


class ControlSettings(BaseSettings):
    """Read from `RLHF_CONTROL_*` by every process of the control plane."""

    model_config = SettingsConfigDict(env_prefix="RLHF_CONTROL_", extra="ignore")

    token: SecretStr | None = Field(None, description="The control token itself.")
    token_file: Path | None = Field(
        None, description="A file holding the control token (a mounted Secret); wins over token."
    )
    allow_unauthenticated: bool = Field(
        False, description="Accept control calls without a token (local experiments only)."
    )

    def token_value(self) -> str | None:
        if self.token_file is not None:
            value = self.token_file.read_text().strip()
            if not value:
                raise ValueError(f"control token file {self.token_file} is empty")
            return value
        return self.token.get_secret_value() if self.token else None


@cache
def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def control_metadata(settings: ControlSettings | None = None) -> list[tuple[str, str]]:
    """The call metadata a control-plane caller sends (none when it has no token)."""
    token = (settings or ControlSettings()).token_value()
    return [(HEADER, f"Bearer {token}")] if token else []


def authorized(metadata: Iterable[tuple[str, str]], expected: str) -> bool:
    given = next((v for k, v in metadata if k == HEADER), "")
    scheme, _, token = given.partition(" ")
    ok = hmac.compare_digest(_digest(token), _digest(expected))
    return ok and scheme == "Bearer"


class ControlAuthInterceptor(grpc.ServerInterceptor):
    """Checks the caller's token on the control methods (full names); other methods pass."""

    def __init__(self, methods: Iterable[str], settings: ControlSettings | None = None):
        self.methods = frozenset(methods)
        self.settings = settings or ControlSettings()
        self.expected = self.settings.token_value()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.methods:
            return handler
        if self.expected is None:
            if self.settings.allow_unauthenticated:
                return handler
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is refused: no control token is configured (RLHF_CONTROL_TOKEN_FILE)",
            )
        if authorized(handler_call_details.invocation_metadata or (), self.expected):
            return handler
        return _refusal(
            handler, grpc.StatusCode.UNAUTHENTICATED, f"{method} needs the control token"
        )


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as `handler` that ends the call with `code`."""

    def refuse(_request, context):
        context.abort(code, message)

    if handler.unary_unary:
        return handler._replace(unary_unary=refuse)
    if handler.stream_unary:
        return handler._replace(stream_unary=refuse)
    if handler.unary_stream:
        return handler._replace(unary_stream=refuse)
    return handler._replace(stream_stream=refuse)
