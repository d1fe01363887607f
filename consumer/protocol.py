"""Wire protocol v1 (docs/protocol.md): the only module that knows the wire format.

Backend apps (through `consumer.client`) and the worker both use it. It imports neither torch nor
transformers nor aio-pika: it turns bytes + AMQP properties into a validated `Job`, and the typed
replies (`GenerationResult`, `TokenReply`, `ErrorReply`) into maps and back. Every bad input raises
`ProtocolError`; nothing else escapes `decode_job`. It checks the wire's JSON types and size limits;
the sampling values themselves are checked by the engine's `SamplingParams`, in one place.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar

import msgpack

from engine.request import ErrorType, SamplingParams, Timings

PROTOCOL_VERSION = 1

MSGPACK = "application/msgpack"
JSON = "application/json"
CONTENT_TYPES = (MSGPACK, JSON)

# AMQP `type` property of replies
REPLY_RESULT = "result"
REPLY_TOKEN = "token"
REPLY_ERROR = "error"
REPLY_TYPES = (REPLY_RESULT, REPLY_TOKEN, REPLY_ERROR)

# headers
HEADER_DEADLINE = "x-deadline-ms"  # absolute Unix epoch ms
HEADER_ERROR_CODE = "x-loraq-error-code"  # on dead-lettered jobs: the error_type
HEADER_ERROR = "x-loraq-error"  # on dead-lettered jobs: the human readable reason
HEADER_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on redeliveries
HEADER_ADAPTER_ID = "x-adapter-id"  # the job's adapter id: what adapter affinity hashes on
HEADER_DEATHS = "x-death"  # set by RabbitMQ on dead-lettered messages

# error_type values: the engine's ErrorType (engine.request imports no torch, like this module)
VALIDATION = ErrorType.VALIDATION.value
ADAPTER_NOT_FOUND = ErrorType.ADAPTER_NOT_FOUND.value
ADAPTER_INVALID = ErrorType.ADAPTER_INVALID.value
PROMPT_TOO_LONG = ErrorType.PROMPT_TOO_LONG.value
DEADLINE_EXCEEDED = ErrorType.DEADLINE_EXCEEDED.value
OVERLOADED = ErrorType.OVERLOADED.value
INTERNAL = ErrorType.INTERNAL.value
ERROR_TYPES = tuple(e.value for e in ErrorType)

ROLES = ("system", "user", "assistant")
ADAPTER_SOURCES = ("local", "hub")
FINISH_REASONS = ("length", "eos_token", "stop_sequence")


class ProtocolError(Exception):
    """A job or reply that breaks the contract. `error_type` is one of `ERROR_TYPES`."""

    def __init__(self, error_type: str, message: str, retryable: bool = False) -> None:
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}; one of {ERROR_TYPES}")
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class Topology:
    """Names of the AMQP objects of the protocol. Tests give each run its own via `prefixed`."""

    exchange: str = "loraq"  # direct: backend apps publish jobs here
    queue: str = "loraq.generate"  # quorum queue
    routing_key: str = "generate"
    dlx: str = "loraq.dlx"  # fanout
    dead_queue: str = "loraq.dead"
    results_exchange: str = "loraq.results"  # topic: results of jobs without reply_to
    # adapter affinity only (workers started with --affinity): x-consistent-hash on x-adapter-id,
    # and the fanout that leads back to the jobs queue (its alternate exchange and the workers' DLX)
    affinity_exchange: str = "loraq.affinity"
    affinity_fallback: str = "loraq.affinity.fallback"
    delivery_limit: int = 5  # quorum x-delivery-limit: deliveries before the broker dead-letters

    def __post_init__(self) -> None:
        if self.delivery_limit < 1:
            raise ValueError("delivery_limit must be >= 1")

    @classmethod
    def prefixed(cls, prefix: str, **overrides: Any) -> Topology:
        """Every name under `prefix` (e.g. a unique test id), routing key unchanged."""
        names = {f.name: f"{prefix}.{f.default}" for f in fields(cls)
                 if f.name not in ("routing_key", "delivery_limit")}
        return cls(**{**names, **overrides})

    def result_routing_key(self, adapter_id: str | None) -> str:
        return f"result.{adapter_id or 'base'}"

    def worker_queue(self, worker_id: str) -> str:
        """One affinity worker's own queue."""
        return f"{self.queue}.worker.{worker_id}"


@dataclass(frozen=True)
class Limits:
    """Size limits on hostile input; a job over any of them is rejected before the model sees it."""

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 200_000  # inputs, or the sum of message contents
    max_messages: int = 512
    max_new_tokens: int = 4096
    max_stop_sequences: int = 8
    max_stop_length: int = 256
    max_adapter_id_length: int = 256
    max_id_length: int = 256  # message_id / correlation_id

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1")

    @classmethod
    def unbounded(cls) -> Limits:
        """Type checks only: what a client validates before publishing (the worker's limits rule)."""
        big = 2**62
        return cls(**{f.name: big for f in fields(cls)})


# the sampling parameters of a job: wire name -> its JSON type (values are SamplingParams' to check)
SAMPLING_TYPES: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int, "do_sample": bool, "temperature": (int, float), "top_k": int,
    "top_p": (int, float), "typical_p": (int, float), "repetition_penalty": (int, float),
    "stop": list, "seed": int,
}
PARAMETER_NAMES = ("adapter_id", "adapter_source", "api_token", *SAMPLING_TYPES, "return_full_text",
                   "details")


@dataclass(frozen=True)
class Parameters:
    """`parameters` of a job, typed. Names follow LoRAX / TGI `/generate`; the sampling ones are
    the engine's SamplingParams (wire `details` is its `logprobs`)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None  # None: the base model alone
    adapter_source: str | None = None  # None: the worker's default
    api_token: str | None = field(default=None, repr=False)  # never logged
    return_full_text: bool = False

    @property
    def details(self) -> bool:
        return self.sampling.logprobs


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


# ---- encoding ------------------------------------------------------------------------------------

def normalize_content_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`; anything unknown is `validation`."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct not in CONTENT_TYPES:
        raise ProtocolError(VALIDATION, f"unsupported content_type {content_type!r}; "
                                        f"use {MSGPACK} or {JSON}")
    return ct


def encode(obj: Any, content_type: str) -> bytes:
    ct = normalize_content_type(content_type)
    if ct == MSGPACK:
        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def decode(body: bytes, content_type: str | None) -> Any:
    ct = normalize_content_type(content_type)
    try:
        if ct == MSGPACK:
            return msgpack.unpackb(body, raw=False)
        return json.loads(body.decode("utf-8"))
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as e:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and msgpack's ExtraData/FormatError
        raise ProtocolError(VALIDATION, f"body is not valid {ct}: {type(e).__name__}") from None


# ---- job decoding and validation -----------------------------------------------------------------

def _fail(message: str, error_type: str = VALIDATION) -> ProtocolError:
    return ProtocolError(error_type, message)


def _opt(params: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """params[name] of JSON type `kind` (null or absent: `default`). bool is never a number here."""
    value = params.get(name)
    if value is None:
        return default
    if kind in (int, float, (int, float)) and isinstance(value, bool):
        raise _fail(f"parameters.{name} must be a number, got a boolean")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise _fail(f"parameters.{name} must be {want}, got {type(value).__name__}")
    return value


def _check_text(value: str, what: str) -> None:
    # surrogates cannot be re-encoded as UTF-8 (JSON \ud800 escapes); reject them here, not at reply
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{what} is not valid unicode") from None


def parse_parameters(raw: Any, limits: Limits) -> Parameters:
    """Wire types and size limits are checked here, sampling values by SamplingParams."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(f"parameters must be a map, got {type(raw).__name__}")

    adapter_id = _opt(raw, "adapter_id", str) or None
    if adapter_id is not None:
        if len(adapter_id) > limits.max_adapter_id_length:
            raise _fail(f"parameters.adapter_id longer than {limits.max_adapter_id_length}")
        if any(ord(c) < 32 or ord(c) == 127 for c in adapter_id):
            raise _fail("parameters.adapter_id contains control characters")
        _check_text(adapter_id, "parameters.adapter_id")
    adapter_source = _opt(raw, "adapter_source", str)
    if adapter_source is not None and adapter_source not in ADAPTER_SOURCES:
        raise _fail(f"parameters.adapter_source must be one of {ADAPTER_SOURCES}")
    api_token = _opt(raw, "api_token", str) or None

    given: dict[str, Any] = {}
    for name, kind in SAMPLING_TYPES.items():
        value = _opt(raw, name, kind)
        if value is not None:
            given[name] = float(value) if kind == (int, float) else tuple(value) if kind is list else value
    try:
        sampling = SamplingParams(**given, logprobs=_opt(raw, "details", bool, False))
    except ValueError as e:  # the message starts with the field's name
        raise _fail(f"parameters.{e}") from None

    if sampling.max_new_tokens > limits.max_new_tokens:
        raise _fail(f"parameters.max_new_tokens must be in 1..{limits.max_new_tokens}")
    if len(sampling.stop) > limits.max_stop_sequences:
        raise _fail(f"parameters.stop has more than {limits.max_stop_sequences} sequences")
    for s in sampling.stop:
        if len(s) > limits.max_stop_length:
            raise _fail(f"parameters.stop sequences must be at most {limits.max_stop_length} chars")
        _check_text(s, "parameters.stop")

    return Parameters(sampling=sampling, adapter_id=adapter_id, adapter_source=adapter_source,
                      api_token=api_token,
                      return_full_text=_opt(raw, "return_full_text", bool, False))


def parse_messages(raw: Any, limits: Limits) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail("messages must be a non-empty list")
    if len(raw) > limits.max_messages:
        raise _fail(f"messages has more than {limits.max_messages} entries")
    out = []
    chars = 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _fail(f"messages[{i}] must be a map")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _fail(f"messages[{i}].role must be one of {ROLES}")
        if not isinstance(content, str):
            raise _fail(f"messages[{i}].content must be a string")
        _check_text(content, f"messages[{i}].content")
        chars += len(content)
        out.append({"role": role, "content": content})
    if chars > limits.max_prompt_chars:
        raise _fail(f"messages are longer than {limits.max_prompt_chars} chars", PROMPT_TOO_LONG)
    return tuple(out)


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
    (the protocol grows by optional fields)."""
    if not isinstance(body, dict):
        raise _fail(f"job body must be a map, got {type(body).__name__}")
    v = body.get("v", PROTOCOL_VERSION)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail("v must be an integer")
    if v != PROTOCOL_VERSION:
        raise _fail(f"unsupported protocol version {v}; this worker speaks v{PROTOCOL_VERSION}")

    inputs, messages = body.get("inputs"), body.get("messages")
    if (inputs is None) == (messages is None):
        raise _fail("exactly one of inputs / messages must be given")
    if inputs is not None:
        if not isinstance(inputs, str):
            raise _fail(f"inputs must be a string, got {type(inputs).__name__}")
        if not inputs:
            raise _fail("inputs must not be empty")
        _check_text(inputs, "inputs")
        if len(inputs) > limits.max_prompt_chars:
            raise _fail(f"inputs are longer than {limits.max_prompt_chars} chars", PROMPT_TOO_LONG)
    else:
        messages = parse_messages(messages, limits)

    params = parse_parameters(body.get("parameters"), limits)
    if params.return_full_text and messages is not None:
        raise _fail("parameters.return_full_text needs inputs (not messages)")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("stream must be a boolean")
    return inputs, messages, params, stream


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


# ---- replies ---------------------------------------------------------------------------------------
# One typed model for both sides: the worker builds these and sends `to_wire()`, the client reads
# them back with `decode_reply`. Each reply's `id` is its job's id; `KIND` is its AMQP `type`.

def _malformed(kind: str, e: Exception) -> ProtocolError:
    return _fail(f"malformed {kind} reply: {type(e).__name__}: {e}")


@dataclass(frozen=True)
class Token:
    """One generated token: streamed in a `token` reply, or listed in a result's details (with
    `details: true`). `index` counts from 0."""

    index: int
    id: int
    text: str
    logprob: float | None = None

    def to_wire(self) -> dict[str, Any]:
        """The token map (its index is the reply's, or its place in the list)."""
        return {"id": self.id, "text": self.text, "logprob": self.logprob}

    @classmethod
    def from_wire(cls, index: int, token: dict[str, Any]) -> Token:
        return cls(index=index, id=token["id"], text=token["text"], logprob=token.get("logprob"))


@dataclass(frozen=True)
class TokenReply:
    KIND: ClassVar[str] = REPLY_TOKEN

    id: str
    token: Token

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "id": self.id, "index": self.token.index,
                "token": self.token.to_wire()}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> TokenReply:
        try:
            return cls(id=body["id"], token=Token.from_wire(body["index"], body["token"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise _malformed(cls.KIND, e) from None


@dataclass(frozen=True)
class Details:
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    tokens: tuple[Token, ...] | None = None  # only when the job asked for details


@dataclass(frozen=True)
class GenerationResult:
    """A `result` reply. `timings` (ms): queue_ms, adapter_load_ms, ttft_ms, total_ms."""

    KIND: ClassVar[str] = REPLY_RESULT

    id: str
    generated_text: str
    details: Details
    timings: Timings
    adapter_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        d = self.details
        details: dict[str, Any] = {"finish_reason": d.finish_reason, "prompt_tokens": d.prompt_tokens,
                                   "generated_tokens": d.generated_tokens, "seed": d.seed}
        if d.tokens is not None:
            details["tokens"] = [t.to_wire() for t in d.tokens]
        t = self.timings
        return {"v": PROTOCOL_VERSION, "id": self.id, "generated_text": self.generated_text,
                "details": details, "adapter_id": self.adapter_id,
                "timings": {"queue_ms": round(t.queue_ms, 3), "adapter_load_ms": round(t.adapter_load_ms, 3),
                            "ttft_ms": round(t.ttft_ms, 3), "total_ms": round(t.total_ms, 3)}}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> GenerationResult:
        try:
            d, t = body["details"], body.get("timings") or {}
            tokens = d.get("tokens")
            return cls(
                id=body["id"], generated_text=body["generated_text"],
                details=Details(finish_reason=d["finish_reason"], prompt_tokens=d["prompt_tokens"],
                                generated_tokens=d["generated_tokens"], seed=d.get("seed"),
                                tokens=None if tokens is None else
                                tuple(Token.from_wire(i, tok) for i, tok in enumerate(tokens))),
                timings=Timings(**{k: float(t.get(k, 0.0)) for k in
                                   ("queue_ms", "adapter_load_ms", "ttft_ms", "total_ms")}),
                adapter_id=body.get("adapter_id"))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise _malformed(cls.KIND, e) from None


@dataclass(frozen=True)
class ErrorReply:
    """An `error` reply. `error_type` is one of ERROR_TYPES (anything else is sent as internal)."""

    KIND: ClassVar[str] = REPLY_ERROR

    id: str | None
    error_type: str
    error: str  # the human-readable reason
    retryable: bool = False

    def to_wire(self) -> dict[str, Any]:
        error_type = self.error_type if self.error_type in ERROR_TYPES else INTERNAL
        return {"v": PROTOCOL_VERSION, "id": self.id, "error": self.error, "error_type": error_type,
                "retryable": self.retryable}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> ErrorReply:
        try:
            return cls(id=body["id"], error_type=body["error_type"], error=body["error"],
                       retryable=bool(body.get("retryable", False)))
        except (KeyError, TypeError) as e:
            raise _malformed(cls.KIND, e) from None


Reply = GenerationResult | TokenReply | ErrorReply
FinalReply = GenerationResult | ErrorReply
_REPLY_CLASSES: dict[str, type[GenerationResult] | type[TokenReply] | type[ErrorReply]] = {
    cls.KIND: cls for cls in (GenerationResult, TokenReply, ErrorReply)}


def decode_reply(body: bytes, content_type: str | None, type: str | None) -> Reply:
    """A reply's bytes and AMQP `type` -> its typed value. Raises ProtocolError (validation)."""
    cls = _REPLY_CLASSES.get(type or "")
    if cls is None:
        raise _fail(f"unknown reply type {type!r}")
    reply = decode(body, content_type)
    if not isinstance(reply, dict):
        raise _fail("reply body must be a map")
    return cls.from_wire(reply)
