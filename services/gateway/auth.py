"""API keys and per-key rate limits.

Keys arrive as `Authorization: Bearer <key>`; the gateway knows only their sha256 digests and
compares digests with `hmac.compare_digest` against every configured one (no early exit), so the
time taken says nothing about how close a wrong key was. Each key has a token bucket; an empty
bucket answers 429 with the seconds until the next token in `Retry-After`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request, status


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller: `key_id` is a short, non-secret prefix of the key's digest."""

    key_id: str


class ApiKeyVerifier:
    """Looks a bearer key up among the configured sha256 digests, in constant time."""

    def __init__(self, digests: list[str]):
        if not digests:
            raise ValueError("at least one API key digest is required")
        self._digests = [d.encode() for d in digests]

    def verify(self, presented: str) -> ApiKey | None:
        candidate = sha256_hex(presented).encode()
        match: bytes | None = None
        for digest in self._digests:
            if hmac.compare_digest(candidate, digest):
                match = digest
        return ApiKey(key_id=match[:12].decode()) if match is not None else None


class TokenBucket:
    """`rate` tokens per second up to `burst`; thread-safe."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, float(burst)
        self._tokens: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """Takes one token for `key`; returns 0 when allowed, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._tokens.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._tokens[key] = (tokens - 1.0, now)
                return 0.0
            self._tokens[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def authenticate(request: Request) -> ApiKey:
    """FastAPI dependency: the caller's key, after the rate limit; 401 or 429 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise _unauthorized("missing bearer API key in the Authorization header")
    state = request.app.state
    api_key = state.verifier.verify(presented.strip())
    if api_key is None:
        raise _unauthorized("invalid API key")
    wait_s = state.rate_limiter.take(api_key.key_id)
    if wait_s > 0:
        state.metrics.rate_limited.inc()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="rate limit exceeded for this API key",
            headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
        )
    return api_key
