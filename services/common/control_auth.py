"""The control plane's authentication: only authenticated callers may change what a model
service serves (`PolicyService.UpdateWeights`, `RewardService.ReloadModel`). A caller is
authenticated by either of:

- **the control token**: one shared secret (a Kubernetes Secret mounted as a file,
  `RLHF_CONTROL_TOKEN_FILE`, or `RLHF_CONTROL_TOKEN`) read by the services and by their callers
  (the trainer's weight push, the refresh's reload). Callers send `authorization: Bearer
  <token>`; the server compares the sha256 of what it got with the sha256 of its own token in
  constant time (`hmac.compare_digest`);
- **its mTLS client identity**: on a server with mutual TLS (`RLHF_<SVC>_GRPC_TLS_CLIENT_CA_FILE`),
  a client certificate whose identity (its DNS/URI subject alternative names, else its common
  name, as gRPC reports them) is one of `RLHF_CONTROL_ALLOWED_IDENTITIES` (comma-separated, e.g.
  `trainer,refresh`). The CA has already verified the certificate; this says which of its
  holders may steer the model.

A service with neither configured refuses control calls (PERMISSION_DENIED) unless
`RLHF_CONTROL_ALLOW_UNAUTHENTICATED=true`, so that forgetting the Secret fails closed. The token
is never logged: it is a `SecretStr`, and refusals name the method, never what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Annotated

import grpc
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.rpc import gate_handler

HEADER = "authorization"


class ControlSettings(BaseSettings):
    """Read from `RLHF_CONTROL_*` by every process of the control plane."""

    model_config = SettingsConfigDict(env_prefix="RLHF_CONTROL_", extra="ignore")

    token: SecretStr | None = Field(None, description="The control token itself.")
    token_file: Path | None = Field(
        None, description="A file holding the control token (a mounted Secret); wins over token."
    )
    allowed_identities: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="mTLS client identities (certificate SAN, else CN) allowed control calls, "
        "comma-separated; needs mutual TLS on the server.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Accept control calls without a token (local experiments only)."
    )

    @field_validator("allowed_identities", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

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


def peer_identities(context: grpc.ServicerContext) -> frozenset[str]:
    """The identities the TLS handshake verified for this call's client (empty without a client
    certificate, or on a plaintext port)."""
    return frozenset(
        identity.decode("utf-8", "replace") for identity in (context.peer_identities() or ())
    )


class ControlAuthInterceptor(grpc.ServerInterceptor):
    """Checks the caller on the control methods (full names); other methods pass.

    The token is read from the call's metadata when the call arrives; the client certificate is
    known only to the call's context, so a call without a valid token is checked for an allowed
    identity when its handler runs."""

    def __init__(self, methods: Iterable[str], settings: ControlSettings | None = None):
        self.methods = frozenset(methods)
        self.settings = settings or ControlSettings()
        self.expected = self.settings.token_value()
        self.identities = frozenset(self.settings.allowed_identities)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.methods:
            return handler
        if self.expected is None and not self.identities:
            if self.settings.allow_unauthenticated:
                return handler
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is refused: no control token or client identity is configured "
                "(RLHF_CONTROL_TOKEN_FILE, RLHF_CONTROL_ALLOWED_IDENTITIES)",
            )
        if self.expected is not None and authorized(
            handler_call_details.invocation_metadata or (), self.expected
        ):
            return handler
        identities = self.identities
        message = f"{method} needs the control token or an allowed client certificate"

        def by_identity(context) -> None:
            if not identities & peer_identities(context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return gate_handler(handler, by_identity)


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as `handler` that ends every call with `code`."""

    def refuse(context) -> None:
        context.abort(code, message)

    return gate_handler(handler, refuse)
