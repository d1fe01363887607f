"""Optional bearer-token authentication: with no tokens configured every request passes.

Health and metrics stay open (load balancers and Prometheus probe them without credentials). A
token is compared in constant time against each configured one. The `Authorization` header is
never forwarded into a job: LoRAX reads it as a hub `api_token` when the body sets none; here a
private hub adapter's token goes in `parameters.api_token` (LoRAX routes) or `api_token` (/v1).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from consumer.gateway.errors import UNAUTHORIZED, GatewayError, is_openai_path

PUBLIC_PATHS = frozenset({"/health", "/healthz", "/metrics"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BearerAuth:
    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def allows(self, authorization: str | None) -> bool:
        if not self._tokens:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        # every token compared, so the time taken does not tell which one nearly matched
        return sum(hmac.compare_digest(given, t) for t in self._tokens) > 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or self.allows(request.headers.get("Authorization")):
            return await handler(request)
        error = GatewayError(UNAUTHORIZED, "a valid `Authorization: Bearer <token>` header is needed")
        response = error.response(openai=is_openai_path(request.path))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
