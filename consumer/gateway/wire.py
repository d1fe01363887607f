"""The job bodies the gateway publishes, read from the protocol itself, and small request readers.

Every LoRAX generate parameter is a wire parameter (`protocol.PARAMETER_NAMES`): a request's are
passed as they are (None dropped, names the wire does not know left out, as LoRAX ignores unknown
fields) and the worker validates their values; its error comes back mapped. The types are checked
here first (`protocol.parse_body`), so a malformed request fails before it is published.

Two dialects: LoRAX requests become LoRAX-dialect jobs (no `v`: the worker applies LoRAX's
defaults and sampling rule, so the gateway does not re-implement them), OpenAI requests v1 jobs
(explicit `do_sample`, since OpenAI samples by default; `fill_context` when max_tokens is unset, so
the worker applies its limit and the context's end as it does for LoRAX's default).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from consumer import protocol
from consumer.gateway.errors import TOO_LARGE, GatewayError

WIRE_PARAMETERS = frozenset(protocol.PARAMETER_NAMES)
TYPES_ONLY = protocol.Limits.unbounded()  # sizes are the worker's to check


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object. Raises GatewayError (too_large, validation)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise GatewayError(TOO_LARGE, e.text or "request body too large") from None
    try:
        data = json.loads(raw)
    except ValueError as e:  # also UnicodeDecodeError
        raise GatewayError(protocol.VALIDATION, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise GatewayError(protocol.VALIDATION, "request body must be a JSON object")
    return data


def job_parameters(requested: dict[str, Any]) -> dict[str, Any]:
    """The job's `parameters` from a request's: wire fields pass (None dropped), others are left out."""
    return {name: value for name, value in requested.items()
            if name in WIRE_PARAMETERS and value is not None}


def unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(protocol.VALIDATION, f"{param} is not supported by this loraq version ({why})",
                        param=param.rpartition(".")[2])


def job_body(*, inputs: str | None = None, messages: list[dict] | None = None,
             parameters: dict[str, Any], stream: bool) -> dict:
    """A v1 job map (protocol.job_body: types checked now, the worker checks its limits).
    Raises GatewayError(validation)."""
    try:
        return protocol.job_body(inputs=inputs, messages=messages, parameters=parameters,
                                 stream=stream)
    except protocol.ProtocolError as e:
        raise GatewayError.from_protocol(e) from None


def lorax_job_body(*, inputs: str, parameters: dict[str, Any], stream: bool) -> dict:
    """A LoRAX-dialect job map (no `v`), types checked as the worker will read it.
    Raises GatewayError(validation)."""
    body: dict[str, Any] = {"inputs": inputs, "parameters": parameters}
    if stream:
        body["stream"] = True
    try:
        protocol.parse_body(body, TYPES_ONLY)
    except protocol.ProtocolError as e:
        raise GatewayError.from_protocol(e) from None
    return body


def unstreamed(generated_text: str, streamed: str) -> str:
    """What a stream must still send so that its text adds up to the result's: all of it was
    streamed in the usual case; none, or a part, when the result was answered from a worker's
    result cache (a job published again after a reconnect: no tokens stream then)."""
    return generated_text[len(streamed):] if generated_text.startswith(streamed) else ""
