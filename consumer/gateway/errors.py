"""Every failure the gateway answers, and how each API family spells it.

A `GatewayError` has a `kind`: one of the wire's `error_type`s (a worker's error reply keeps its
own) or one of the gateway's (`unavailable`, `unauthorized`, `too_large`). Each route family turns
it into the status code and body its clients parse, so each client library raises its own
matching exception:

| kind | LoRAX routes: status, error_type (lorax-client raises) | /v1 routes: status, type / code (openai raises) |
|---|---|---|
| validation | 422 validation (ValidationError) | 400 invalid_request_error (BadRequestError) |
| prompt_too_long | 422 validation (ValidationError) | 400 invalid_request_error / context_length_exceeded |
| adapter_not_found | 424 generation (GenerationError) | 404 invalid_request_error / model_not_found (NotFoundError) |
| adapter_invalid | 424 generation (GenerationError) | 400 invalid_request_error / adapter_invalid |
| internal | 424 generation (GenerationError) | 500 server_error (InternalServerError) |
| overloaded | 429 overloaded (OverloadedError) | 429 rate_limit_error / overloaded (RateLimitError) |
| deadline_exceeded | 504 deadline_exceeded (ShardTimeoutError) | 504 timeout_error (InternalServerError) |
| unavailable | 503 unavailable (UnknownError) | 503 server_error / unavailable (InternalServerError) |
| unauthorized | 401 unauthorized (UnknownError) | 401 invalid_request_error / invalid_api_key (AuthenticationError) |
| too_large | 413 validation (ValidationError) | 413 invalid_request_error |

LoRAX's router answers adapter load failures and shard errors as 424 `generation`, validation as
422 and a full queue as 429; its messages start the same way ("Input validation error: ...").
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from consumer import protocol

UNAVAILABLE = "unavailable"  # no queue for the job, or no worker consuming it
UNAUTHORIZED = "unauthorized"
TOO_LARGE = "too_large"
KINDS = (*protocol.ERROR_TYPES, UNAVAILABLE, UNAUTHORIZED, TOO_LARGE)

# kind -> (status, LoRAX error_type, message prefix as LoRAX's router words it)
LORAX: dict[str, tuple[int, str, str]] = {
    protocol.VALIDATION: (422, "validation", "Input validation error: "),
    protocol.PROMPT_TOO_LONG: (422, "validation", "Input validation error: "),
    protocol.ADAPTER_NOT_FOUND: (424, "generation", "Request failed during generation: "),
    protocol.ADAPTER_INVALID: (424, "generation", "Request failed during generation: "),
    protocol.INTERNAL: (424, "generation", "Request failed during generation: "),
    protocol.OVERLOADED: (429, "overloaded", "Model is overloaded: "),
    protocol.DEADLINE_EXCEEDED: (504, "deadline_exceeded", ""),
    UNAVAILABLE: (503, "unavailable", ""),
    UNAUTHORIZED: (401, "unauthorized", ""),
    TOO_LARGE: (413, "validation", "Input validation error: "),
}
# kind -> (status, OpenAI error type, code)
OPENAI: dict[str, tuple[int, str, str | None]] = {
    protocol.VALIDATION: (400, "invalid_request_error", None),
    protocol.PROMPT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
    protocol.ADAPTER_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    protocol.ADAPTER_INVALID: (400, "invalid_request_error", "adapter_invalid"),
    protocol.INTERNAL: (500, "server_error", None),
    protocol.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    protocol.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
    UNAVAILABLE: (503, "server_error", "unavailable"),
    UNAUTHORIZED: (401, "invalid_request_error", "invalid_api_key"),
    TOO_LARGE: (413, "invalid_request_error", None),
}
RETRYABLE = frozenset({protocol.OVERLOADED, UNAVAILABLE})
# the field a wire message names first: "parameters.top_k must be ...", "messages[2].role ..."
_FIELD = re.compile(r"^(?:parameters\.(\w+)|(messages)\b)")


class GatewayError(Exception):
    """A request that cannot be answered with a result. `param`: the request field at fault, when
    one is; `retryable`: whether sending the same request again may succeed."""

    def __init__(self, kind: str, message: str, *, param: str | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        assert kind in KINDS, kind
        self.kind = kind
        self.message = message
        self.param = param
        self.retryable = kind in RETRYABLE if retryable is None else retryable

    @classmethod
    def from_reply(cls, reply: protocol.ErrorReply) -> GatewayError:
        """A worker's error reply. Overloaded stays retryable after the worker gave up retrying."""
        kind = reply.error_type if reply.error_type in protocol.ERROR_TYPES else protocol.INTERNAL
        return cls(kind, reply.error, param=field_of(reply.error),
                   retryable=reply.retryable or kind in RETRYABLE)

    @classmethod
    def from_protocol(cls, e: protocol.ProtocolError) -> GatewayError:
        return cls(e.error_type, e.message, param=field_of(e.message), retryable=e.retryable)

    def status(self, openai: bool) -> int:
        return (OPENAI if openai else LORAX)[self.kind][0]

    def lorax_body(self) -> dict[str, str]:
        """LoRAX's ErrorResponse: {"error", "error_type"}."""
        _, error_type, prefix = LORAX[self.kind]
        return {"error": prefix + self.message, "error_type": error_type}

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        _, error_type, code = OPENAI[self.kind]
        return {"error": {"message": self.message, "type": error_type, "param": self.param,
                          "code": code or self.kind}}

    def response(self, openai: bool) -> web.Response:
        """The HTTP error response. On /v1, `x-should-retry` tells the openai SDK whether its
        automatic retries could help (it would retry every 5xx otherwise)."""
        body = self.openai_body() if openai else self.lorax_body()
        headers = {"x-should-retry": "true" if self.retryable else "false"} if openai else None
        return web.Response(status=self.status(openai), headers=headers,
                            text=json.dumps(body, ensure_ascii=False), content_type="application/json")


def field_of(message: str) -> str | None:
    """The request field a wire error message starts with (OpenAI's `param`), if any."""
    m = _FIELD.match(message)
    return (m.group(1) or m.group(2)) if m else None


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")
