"""What the wire carries today, read from the protocol itself, and the job body built from a request.

A request parameter the job's `parameters` map knows (`protocol.PARAMETER_NAMES`) is passed
as it is; the worker validates it and its error comes back mapped. A parameter LoRAX or OpenAI
defines but the wire does not carry yet is refused with a validation error naming it, unless it
is at its "off" value (what LoRAX does when it is absent): never silently dropped. When the
protocol gains one of them (e.g. `response_format`, `return_k_alternatives`), it passes through
with no change here.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from consumer import protocol
from consumer.gateway.errors import TOO_LARGE, GatewayError

WIRE_PARAMETERS = frozenset(protocol.PARAMETER_NAMES)
DEFAULT_MAX_NEW_TOKENS = protocol.Parameters().sampling.max_new_tokens  # a job that sets none

# LoRAX generate parameters the wire may not carry, with the values that mean "not used"
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "merged_adapters": (None,),
    "best_of": (None, 1),
    "watermark": (None, False),
    "truncate": (None,),
    "decoder_input_details": (None, False),
    "return_k_alternatives": (None, 0),
    "response_format": (None,),
    "ignore_eos_token": (None, False),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "apply_chat_template": (None, False),
}


def supports(name: str) -> bool:
    """Whether the job's parameters carry `name`."""
    return name in WIRE_PARAMETERS


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


def job_parameters(requested: dict[str, Any], *, where: str = "parameters") -> dict[str, Any]:
    """The job's `parameters` from a request's: wire fields pass (None dropped), LoRAX fields the
    wire lacks must be off, anything else is ignored as LoRAX ignores unknown fields. `where`
    prefixes the field named in an error ("" for OpenAI's top-level fields)."""
    out: dict[str, Any] = {}
    for name, value in requested.items():
        if name in WIRE_PARAMETERS:
            if value is not None:
                out[name] = value
        elif name in OFF_VALUES and not _is_off(value, OFF_VALUES[name]):
            raise unsupported(f"{where}.{name}" if where else name)
    return out


def unsupported(param: str, why: str = "the queue's wire protocol does not carry it yet") -> GatewayError:
    return GatewayError(protocol.VALIDATION, f"{param} is not supported by this loraq version ({why})",
                        param=param.rpartition(".")[2])


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    # bool is an int in Python: False must not equal 0 where 0 is meaningful, and the reverse
    return any(value is o or (type(value) is type(o) and value == o) for o in off)


def job_body(*, inputs: str | None = None, messages: list[dict] | None = None,
             parameters: dict[str, Any], stream: bool) -> dict:
    """The job map (protocol.job_body: type checks now, so a bad request fails before publishing;
    the worker checks its limits). Raises GatewayError(validation)."""
    try:
        return protocol.job_body(inputs=inputs, messages=messages, parameters=parameters,
                                 stream=stream)
    except protocol.ProtocolError as e:
        raise GatewayError.from_protocol(e) from None


def unstreamed(generated_text: str, streamed: str) -> str:
    """What a stream must still send so that its text adds up to the result's: all of it was
    streamed in the usual case; none, or a part, when the result was answered from a worker's
    result cache (a job published again after a reconnect: no tokens stream then)."""
    return generated_text[len(streamed):] if generated_text.startswith(streamed) else ""


def number(value: Any) -> float | None:
    """value as a float when it is a real number (not a bool), else None (left for validation)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
