"""A job: AMQP body + properties -> a validated `Job` (decode_job), and the job map a client
publishes (job_body, encode_job). A body with `"v": 1` is loraq's v1, one without `v` is a LoRAX
`/generate` body (docs/lorax.md)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from consumer.protocol.codec import MSGPACK, PROTOCOL_VERSION, decode, encode, normalize_content_type
from consumer.protocol.errors import PROMPT_TOO_LONG, _fail
from consumer.protocol.headers import HEADER_DEADLINE, HEADER_DEATHS
from consumer.protocol.limits import Limits
from consumer.protocol.parameters import Parameters, _check_text, _opt, parse_parameters

# the chat roles a message may have; whether the model's chat template renders one (a system message,
# a tool result, a developer message) is the engine's to say, as a validation error
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Job:
    """A decoded, validated job. Exactly one of `inputs` / `messages` is set."""

    id: str
    correlation_id: str | None
    reply_to: str | None
    content_type: str
    parameters: Parameters
    inputs: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    stream: bool = False
    deadline_ms: int | None = None  # absolute Unix epoch ms

    @property
    def adapter_id(self) -> str | None:
        return self.parameters.adapter_id

    def expired(self, now_ms: float | None = None) -> bool:
        if self.deadline_ms is None:
            return False
        return (time.time() * 1000.0 if now_ms is None else now_ms) >= self.deadline_ms


def parse_messages(raw: Any, limits: Limits) -> tuple[dict[str, str], ...]:
    """A chat: maps {role, content} (other keys are ignored). `content` is a string or OpenAI's
    content parts, whose text parts join in order into one string; any other part (image_url,
    input_audio, ...) is refused, named by its index."""
    if not isinstance(raw, list) or not raw:
        raise _fail("messages must be a non-empty list")
    if len(raw) > limits.max_messages:
        raise _fail(f"messages has more than {limits.max_messages} entries")
    out = []
    chars = 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _fail(f"messages[{i}] must be a map")
        role = m.get("role")
        if role not in ROLES:
            raise _fail(f"messages[{i}].role must be one of {ROLES}")
        content = _message_content(m.get("content"), f"messages[{i}].content")
        chars += len(content)
        out.append({"role": role, "content": content})
    if chars > limits.max_prompt_chars:
        raise _fail(f"messages are longer than {limits.max_prompt_chars} chars", PROMPT_TOO_LONG)
    return tuple(out)


def _message_content(content: Any, what: str) -> str:
    """A message's content as one string: the string itself, or its text parts joined."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _fail(f"{what}[{j}] must be a map (a content part)")
            if part.get("type") != "text":
                kind = repr(part.get("type"))[:64]
                raise _fail(f"{what}[{j}].type {kind} is not supported: only text parts are")
            if not isinstance(part.get("text"), str):
                raise _fail(f"{what}[{j}].text must be a string")
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise _fail(f"{what} must be a string or a list of content parts")
    _check_text(content, what)
    return content


def parse_deadline(headers: dict | None, expiration: Any, timestamp: datetime | None,
                   received_ms: float) -> int | None:
    """The earliest of `x-deadline-ms` and `expiration` (AMQP per-message TTL in ms: a string on the
    wire). The TTL counts from the publish time; our receipt bounds it from above, and so do the
    AMQP `timestamp` and the time of a dead-lettering (whole seconds, hence + 1 s): the earliest
    bound is the tightest. A job dead-lettered on its way here (affinity spill-over) lost its
    `expiration` to RabbitMQ, which keeps it as `x-death[].original-expiration`."""
    deadlines = []
    raw = (headers or {}).get(HEADER_DEADLINE)
    if raw is not None:
        if isinstance(raw, bytes):
            raw = raw.decode("ascii", "replace")
        try:
            if isinstance(raw, bool):
                raise ValueError
            deadlines.append(int(raw))
        except (TypeError, ValueError):
            raise _fail(f"header {HEADER_DEADLINE} must be an integer (epoch ms)") from None
    bounds = [received_ms]
    if expiration in (None, ""):
        expiration, died = _original_expiration(headers)
        if died is not None:
            bounds.append(died.timestamp() * 1000.0 + 1000.0)
    if expiration not in (None, ""):
        try:
            ttl_ms = float(expiration)
        except (TypeError, ValueError):
            raise _fail("expiration must be a number of milliseconds") from None
        if timestamp is not None:
            bounds.append(timestamp.timestamp() * 1000.0 + 1000.0)
        deadlines.append(int(min(bounds) + ttl_ms))
    return min(deadlines) if deadlines else None


def _original_expiration(headers: dict | None) -> tuple[Any, datetime | None]:
    """(original-expiration, time of that death) from a dead-lettered job's x-death, or Nones."""
    deaths = (headers or {}).get(HEADER_DEATHS)
    if not isinstance(deaths, list):
        return None, None
    for death in reversed(deaths):  # oldest last: the first death stripped the expiration
        if isinstance(death, dict) and death.get("original-expiration") not in (None, ""):
            died = death.get("time")
            return death["original-expiration"], died if isinstance(died, datetime) else None
    return None, None


def job_id_of(message_id: str | None, correlation_id: str | None, body: bytes,
              reply_to: str | None) -> str:
    """message_id, else correlation_id, else a digest of the job: stable across redeliveries."""
    if message_id:
        return message_id
    if correlation_id:
        return correlation_id
    return "sha256:" + hashlib.sha256((reply_to or "").encode() + b"\0" + body).hexdigest()[:32]


def parse_body(body: Any, limits: Limits) -> tuple[str | None, tuple | None, Parameters, bool]:
    """Validate a decoded job map: (inputs, messages, parameters, stream). Unknown keys are ignored
    (the protocol grows by optional fields). Without `v` the body is LoRAX's (module docstring)."""
    if not isinstance(body, dict):
        raise _fail(f"job body must be a map, got {type(body).__name__}")
    v = body.get("v")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise _fail("v must be an integer")
    if v is not None and v != PROTOCOL_VERSION:
        raise _fail(f"unsupported protocol version {v}; this worker speaks v{PROTOCOL_VERSION}")
    params = parse_parameters(body.get("parameters"), limits, lorax=v is None)

    inputs, messages = body.get("inputs"), body.get("messages")
    if (inputs is None) == (messages is None):
        raise _fail("exactly one of inputs / messages must be given")
    if _opt(body.get("parameters") or {}, "apply_chat_template", bool, False):
        inputs, messages = None, _chat_inputs(inputs, limits)
    elif inputs is not None:
        if not isinstance(inputs, str):
            raise _fail(f"inputs must be a string, got {type(inputs).__name__}")
        if not inputs:
            raise _fail("inputs must not be empty")
        _check_text(inputs, "inputs")
        if len(inputs) > limits.max_prompt_chars:
            raise _fail(f"inputs are longer than {limits.max_prompt_chars} chars", PROMPT_TOO_LONG)
    else:
        messages = parse_messages(messages, limits)

    if params.return_full_text and messages is not None:
        raise _fail("parameters.return_full_text needs inputs (not messages or apply_chat_template)")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("stream must be a boolean")
    if stream and params.sampling.best_of > 1:
        raise _fail("parameters.best_of > 1 is not supported with stream: true")
    return inputs, messages, params, stream


def _chat_inputs(inputs: Any, limits: Limits) -> tuple[dict[str, str], ...]:
    """`apply_chat_template: true`: `inputs` is a chat as a JSON string, a list of messages (what
    the field meant when LoRAX added it; the model's chat template then renders it)."""
    if not isinstance(inputs, str):
        raise _fail("parameters.apply_chat_template needs inputs: a JSON list of messages, as a string")
    try:
        messages = json.loads(inputs)
    except (ValueError, RecursionError):
        raise _fail("parameters.apply_chat_template: inputs is not JSON (a list of messages)") from None
    return parse_messages(messages, limits)


def decode_job(body: bytes, content_type: str | None, headers: dict | None, message_id: str | None,
               correlation_id: str | None, reply_to: str | None, expiration: Any,
               limits: Limits, *, timestamp: datetime | None = None,
               received_ms: float | None = None) -> Job:
    """AMQP body + properties -> a validated Job. Raises ProtocolError for every bad input."""
    if len(body) > limits.max_body_bytes:
        raise _fail(f"body is {len(body)} bytes, more than {limits.max_body_bytes}")
    for name, value in (("message_id", message_id), ("correlation_id", correlation_id)):
        if value is not None and len(value) > limits.max_id_length:
            raise _fail(f"{name} longer than {limits.max_id_length}")
    ct = normalize_content_type(content_type)
    inputs, messages, params, stream = parse_body(decode(body, ct), limits)
    received = time.time() * 1000.0 if received_ms is None else received_ms
    return Job(
        id=job_id_of(message_id, correlation_id, body, reply_to),
        correlation_id=correlation_id,
        reply_to=reply_to or None,
        content_type=ct,
        parameters=params,
        inputs=inputs,
        messages=messages,
        stream=stream,
        deadline_ms=parse_deadline(headers, expiration, timestamp, received),
    )


def job_body(*, inputs: str | None = None, messages: list[dict] | None = None,
             parameters: dict | None = None, stream: bool = False,
             limits: Limits | None = None) -> dict:
    """The job map a client publishes; validated (types always, sizes against `limits`)."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION}
    if inputs is not None:
        body["inputs"] = inputs
    if messages is not None:
        body["messages"] = list(messages)
    params = {k: v for k, v in (parameters or {}).items() if v is not None}
    if "stop" in params:
        params["stop"] = list(params["stop"])
    if params:
        body["parameters"] = params
    if stream:
        body["stream"] = True
    parse_body(body, limits or Limits.unbounded())
    return body


def encode_job(*, inputs: str | None = None, messages: list[dict] | None = None,
               parameters: dict | None = None, stream: bool = False,
               content_type: str = MSGPACK, limits: Limits | None = None) -> bytes:
    return encode(job_body(inputs=inputs, messages=messages, parameters=parameters, stream=stream,
                           limits=limits), content_type)
