"""OpenAI's error object for every error of the OpenAI-compatible routes:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages[0].role",
               "code": null}}

Routes built with `OpenAIRoute` answer every failure in this shape, whatever raised it: a
validation error of the body (400 naming the field in `param`), an `OpenAIError`, an
HTTPException of a dependency (401 from the API key check, 429 from the rate limit), or a bug
(500). The platform's own routes (/v1/feedback, ...) keep FastAPI's 422 `detail` shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
"""OpenAI's `type` by status; every 5xx is a `server_error`."""

CODES = {
    401: "invalid_api_key",
    429: "rate_limit_exceeded",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


class OpenAIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code if code is not None else CODES.get(status)

    def body(self) -> dict:
        kind = TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def param_of(loc: tuple | list, error_type: str = "", ctx: dict | None = None) -> str | None:
    """A pydantic error location as OpenAI writes a parameter: ("body", "messages", 0, "role")
    -> "messages[0].role". Union member tags and dict keys end the path; an unknown field
    (extra_forbidden) is named."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for k, part in enumerate(parts):
        last_extra = error_type == "extra_forbidden" and k == len(parts) - 1
        if isinstance(part, int):
            out += f"[{part}]"
        elif k > 0 and isinstance(parts[k - 1], int) and part in TAGS:
            continue  # a list of tagged unions: the member's tag follows the index
        elif isinstance(part, str) and (part in FIELD_NAMES or last_extra):
            out += f".{part}" if out else part
        else:
            break
    if error_type in ("union_tag_invalid", "union_tag_not_found") and ctx:
        out += "." + str(ctx.get("discriminator", "")).strip("'")
    return out or None


FIELD_NAMES: set[str] = set()
"""Every field name of the OpenAI request schemas (filled by `register_fields`)."""
TAGS: set[str] = set()
"""The values of their discriminators (`role`, `type`), which pydantic puts in error paths."""


def register_fields(*models) -> None:
    seen = set()

    def walk(model) -> None:
        if model in seen or not hasattr(model, "model_fields"):
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            FIELD_NAMES.add(name)
            if name in ("role", "type") and getattr(info.annotation, "__origin__", None) is Literal:
                TAGS.update(info.annotation.__args__)
            for arg in _types_in(info.annotation):
                walk(arg)

    for model in models:
        walk(model)


def _types_in(annotation) -> list:
    found, stack = [], [annotation]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(getattr(current, "__args__", ()) or ())
        stack.extend(getattr(current, "__metadata__", ()) or ())
        origin = getattr(current, "__origin__", None)
        if origin is not None:
            stack.append(origin)
    return [t for t in found if isinstance(t, type)]


def from_validation(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return OpenAIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the body is not valid JSON: {first.get('msg')}")
    params = [param_of(e.get("loc", ()), e.get("type", ""), e.get("ctx")) for e in errors]
    lines = []
    for param, e in zip(params, errors):
        line = f"{param}: {e.get('msg')}" if param else str(e.get("msg"))
        if line not in lines:
            lines.append(line)
    message = "; ".join(lines[:5]) + ("; ..." if len(lines) > 5 else "")
    return OpenAIError(400, message, params[0])


def from_http(exc: HTTPException) -> OpenAIError:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return OpenAIError(exc.status_code, detail, headers=exc.headers)


class OpenAIRoute(APIRoute):
    """An APIRoute whose every error, raised anywhere in its dependencies or handler, is
    OpenAI's error object."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return from_validation(exc).response()
            except HTTPException as exc:
                return from_http(exc).response()
            except Exception:
                log.exception("OpenAI route %s failed", request.url.path)
                return OpenAIError(500, "internal error in the gateway").response()

        return route
