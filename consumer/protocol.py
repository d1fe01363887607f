"""Wire protocol v1 (docs/protocol.md): the only module that knows the wire format.

Backend apps (through `consumer.client`) and the worker both use it. It imports neither torch nor
transformers nor aio-pika: it turns bytes + AMQP properties into a validated `Job`, and the typed
replies (`GenerationResult`, `TokenReply`, `ErrorReply`) into maps and back. Every bad input raises
`ProtocolError`; nothing else escapes `decode_job`. It checks the wire's JSON types and size limits;
the sampling values themselves are checked by the engine's `SamplingParams`, in one place.

Two dialects share the format: a body with `"v": 1` is loraq's v1, a body without `v` is a LoRAX
`/generate` body and keeps LoRAX's defaults and sampling rule (docs/lorax.md lists the fields).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar

import msgpack

from engine.request import (
    ErrorType,
    MergedAdapters,
    ResponseFormat,
    SamplingParams,
    ScoredToken,
    Timings,
    TokenEvent,
)

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
HEADER_RETRIES = "x-loraq-retries"  # on a job back from the retry queue: its failed attempts so far

# error_type values: the engine's ErrorType (engine.request imports no torch, like this module)
VALIDATION = ErrorType.VALIDATION.value
ADAPTER_NOT_FOUND = ErrorType.ADAPTER_NOT_FOUND.value
ADAPTER_INVALID = ErrorType.ADAPTER_INVALID.value
PROMPT_TOO_LONG = ErrorType.PROMPT_TOO_LONG.value
DEADLINE_EXCEEDED = ErrorType.DEADLINE_EXCEEDED.value
OVERLOADED = ErrorType.OVERLOADED.value
INTERNAL = ErrorType.INTERNAL.value
ERROR_TYPES = tuple(e.value for e in ErrorType)

# the chat roles a message may have; whether the model's chat template renders one (a system message,
# a tool result, a developer message) is the engine's to say, as a validation error
ROLES = ("system", "user", "assistant", "tool", "developer")
ADAPTER_SOURCES = ("local", "hub")
FINISH_REASONS = ("length", "eos_token", "stop_sequence")
MAX_MERGED_ADAPTERS = 16  # adapters one merged_adapters may name: each is read from source to build it
MAX_BEST_OF = 4  # sequences one job may ask for: each costs a whole generation
MAX_K_ALTERNATIVES = 100  # return_k_alternatives: each is decoded once per generated token


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
    retry_queue: str = "loraq.retry"  # quorum: failed jobs wait out their backoff here, then go back
    # fanout of cancel messages, one exclusive queue per worker bound to it; "" means
    # `<exchange>.cancel`, so a publisher that knows the jobs exchange knows this one too
    cancel_exchange: str = ""
    # adapter affinity only (workers started with --affinity): x-consistent-hash on x-adapter-id,
    # and the fanout that leads back to the jobs queue (its alternate exchange and the workers' DLX)
    affinity_exchange: str = "loraq.affinity"
    affinity_fallback: str = "loraq.affinity.fallback"
    delivery_limit: int = 5  # quorum x-delivery-limit: deliveries before the broker dead-letters

    def __post_init__(self) -> None:
        if self.delivery_limit < 1:
            raise ValueError("delivery_limit must be >= 1")
        if not self.cancel_exchange:
            object.__setattr__(self, "cancel_exchange", f"{self.exchange}.cancel")

    @classmethod
    def prefixed(cls, prefix: str, **overrides: Any) -> Topology:
        """Every name under `prefix` (e.g. a unique test id), routing key unchanged."""
        names = {f.name: f"{prefix}.{f.default}" for f in fields(cls)
                 if f.name not in ("routing_key", "delivery_limit", "cancel_exchange")}
        return cls(**{**names, **overrides})

    def result_routing_key(self, adapter_id: str | None) -> str:
        return f"result.{adapter_id or 'base'}"

    def worker_queue(self, worker_id: str) -> str:
        """One affinity worker's own queue."""
        return f"{self.queue}.worker.{worker_id}"

    def cancel_queue(self, worker_id: str) -> str:
        """One worker's own queue of cancel messages."""
        return f"{self.cancel_exchange}.worker.{worker_id}"


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


# the sampling parameters of a job: wire name -> (SamplingParams field, JSON type); their values
# are SamplingParams' to check
_NUMBER = (int, float)
SAMPLING_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "max_new_tokens": ("max_new_tokens", int), "do_sample": ("do_sample", bool),
    "temperature": ("temperature", _NUMBER), "top_k": ("top_k", int), "top_p": ("top_p", _NUMBER),
    "typical_p": ("typical_p", _NUMBER), "repetition_penalty": ("repetition_penalty", _NUMBER),
    "frequency_penalty": ("frequency_penalty", _NUMBER), "presence_penalty": ("presence_penalty", _NUMBER),
    "stop": ("stop", list), "seed": ("seed", int), "best_of": ("best_of", int),
    "details": ("logprobs", bool), "decoder_input_details": ("prompt_logprobs", bool),
    "return_k_alternatives": ("return_k_alternatives", int), "ignore_eos_token": ("ignore_eos", bool),
}
_WIRE_NAMES = {attr: name for name, (attr, _) in SAMPLING_FIELDS.items()}
PARAMETER_NAMES = ("adapter_id", "adapter_source", "api_token", "merged_adapters", *SAMPLING_FIELDS, "return_full_text",
                   "truncate", "watermark", "apply_chat_template", "response_format")


@dataclass(frozen=True)
class Parameters:
    """`parameters` of a job, typed. Names follow LoRAX / TGI `/generate`; the sampling ones are
    the engine's SamplingParams (wire `details` is its `logprobs`)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None  # None: the base model alone
    adapter_source: str | None = None  # None: the worker's default
    api_token: str | None = field(default=None, repr=False)  # never logged
    return_full_text: bool = False
    truncate: int | None = None  # keep the last `truncate` prompt tokens
    merged_adapters: MergedAdapters | None = None  # LoRAX's: a merge of adapters instead of adapter_id
    response_format: ResponseFormat | None = None  # None: the text is unconstrained

    @property
    def details(self) -> bool:
        return self.sampling.logprobs

    @property
    def decoder_input_details(self) -> bool:
        return self.sampling.prompt_logprobs


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


def parse_merged_adapters(raw: Any, limits: Limits) -> MergedAdapters | None:
    """LoRAX's `merged_adapters` (router AdapterParameters): `ids`, `weights` (default [], so they
    must be given, one per id), `merge_strategy` (default linear), `density` (default 0.0),
    `majority_sign_method` (default total); the two names in any case, as LoRAX's router reads them.
    Values are MergedAdapters' to check."""
    if raw is None:
        return None
    what = "parameters.merged_adapters"
    if not isinstance(raw, dict):
        raise _fail(f"{what} must be a map, got {type(raw).__name__}")
    ids, weights = raw.get("ids"), raw.get("weights", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fail(f"{what}.ids must be a list of adapter ids")
    if len(ids) > MAX_MERGED_ADAPTERS:
        raise _fail(f"{what}.ids has more than {MAX_MERGED_ADAPTERS} adapters")
    for i, adapter_id in enumerate(ids):
        if len(adapter_id) > limits.max_adapter_id_length:
            raise _fail(f"{what}.ids[{i}] longer than {limits.max_adapter_id_length}")
        if any(ord(c) < 32 or ord(c) == 127 for c in adapter_id):
            raise _fail(f"{what}.ids[{i}] contains control characters")
        _check_text(adapter_id, f"{what}.ids[{i}]")
    if not isinstance(weights, list) or any(isinstance(w, bool) or not isinstance(w, int | float) for w in weights):
        raise _fail(f"{what}.weights must be a list of numbers")
    given: dict[str, Any] = {}
    for name in ("merge_strategy", "majority_sign_method"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise _fail(f"{what}.{name} must be a string")
        if value is not None:
            given[name] = value.lower()
    density = raw.get("density", 0.0)
    if isinstance(density, bool) or not isinstance(density, int | float):
        raise _fail(f"{what}.density must be a number")
    try:
        return MergedAdapters(ids=tuple(ids), weights=tuple(float(w) for w in weights), density=float(density),
                              **given)
    except ValueError as e:  # the message starts with merged_adapters.<field>
        raise _fail(f"parameters.{e}") from None


def merged_adapters_to_wire(merge: MergedAdapters) -> dict[str, Any]:
    """The `merged_adapters` map a client publishes (parse_merged_adapters reads it back)."""
    return {"ids": list(merge.ids), "weights": list(merge.weights), "merge_strategy": merge.merge_strategy,
            "density": merge.density, "majority_sign_method": merge.majority_sign_method}


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex")
# LoRAX's schema for a json_object without one (router/src/lib.rs, default_json_schema): any object
DEFAULT_JSON_SCHEMA = {
    "additionalProperties": {"type": ["object", "string", "integer", "number", "boolean", "null"]},
    "title": "ArbitraryJsonModel", "type": "object",
}


def parse_response_format(raw: Any) -> ResponseFormat | None:
    """LoRAX's `response_format` (docs/protocol.md): {"type": "json_object", "schema": {...}} makes
    the text JSON valid against the schema (LoRAX's any-object schema when none is given);
    "json_schema" also reads OpenAI's shape, {"json_schema": {"name": ..., "schema": {...}}}; "text"
    leaves the text free; loraq adds {"type": "regex", "pattern": "..."}, matched in full. Only the
    JSON types are checked here: whether a schema can be enforced is the engine's to say."""
    if raw is None:
        return None
    what = "parameters.response_format"
    if not isinstance(raw, dict):
        raise _fail(f"{what} must be a map, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise _fail(f"{what}.type must be one of {RESPONSE_FORMAT_TYPES}")
    if kind == "regex":
        pattern = raw.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise _fail(f"{what}.pattern must be a non-empty string (a regex)")
        _check_text(pattern, f"{what}.pattern")
        return ResponseFormat("regex", pattern)
    schema = raw.get("schema")
    openai = raw.get("json_schema")
    if kind == "json_schema" and openai is not None:
        if not isinstance(openai, dict):
            raise _fail(f"{what}.json_schema must be a map, got {type(openai).__name__}")
        schema = openai.get("schema", schema)
    if kind == "text":
        if schema is not None:
            raise _fail(f"{what}: type text takes no schema (use json_object)")
        return None
    if schema is None:
        schema = DEFAULT_JSON_SCHEMA
    if not isinstance(schema, dict):
        raise _fail(f"{what}.schema must be a map (a JSON schema), got {type(schema).__name__}")
    try:
        return ResponseFormat.json_schema(schema)
    except (TypeError, ValueError, RecursionError) as e:  # bytes or NaN from msgpack, or too deep
        raise _fail(f"{what}.schema is not JSON: {e}") from None


def response_format_to_wire(response_format: ResponseFormat) -> dict[str, Any]:
    """The `response_format` map a client publishes: LoRAX's json_object with its schema, or loraq's
    regex (parse_response_format reads it back)."""
    if response_format.type == "regex":
        return {"type": "regex", "pattern": response_format.value}
    return {"type": "json_object", "schema": json.loads(response_format.value)}


def parse_parameters(raw: Any, limits: Limits, *, lorax: bool = False) -> Parameters:
    """Wire types and size limits are checked here, sampling values by SamplingParams. `lorax`: the
    body had no `v`, so LoRAX's sampling rule and its max_new_tokens default (as many as the
    context allows: the worker's limit, and the engine stops at the context's end) apply."""
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
    merged_adapters = parse_merged_adapters(raw.get("merged_adapters"), limits)
    if merged_adapters is not None and adapter_id is not None:  # LoRAX's AdapterIdConflict
        raise _fail("parameters.merged_adapters: at most one of adapter_id or merged_adapters may be given")

    if _opt(raw, "watermark", bool, False):
        raise _fail("parameters.watermark is not supported by loraq (no watermarking logits processor)")
    truncate = _opt(raw, "truncate", int)
    if truncate is not None and truncate < 1:
        raise _fail("parameters.truncate must be >= 1")

    given: dict[str, Any] = {}
    for name, (attr, kind) in SAMPLING_FIELDS.items():
        value = _opt(raw, name, kind)
        if value is not None:
            given[attr] = float(value) if kind == _NUMBER else tuple(value) if kind is list else value
    if given.get("prompt_logprobs"):  # LoRAX answers decoder_input_details with the full details
        given["logprobs"] = True
    if lorax:
        given.setdefault("max_new_tokens", limits.max_new_tokens)
    try:
        sampling = SamplingParams.lorax(**given) if lorax else SamplingParams(**given)
    except ValueError as e:  # the message starts with the field's name
        attr, _, rest = str(e).partition(" ")
        raise _fail(f"parameters.{_WIRE_NAMES.get(attr, attr)} {rest}") from None
    if sampling.best_of > MAX_BEST_OF:
        raise _fail(f"parameters.best_of must be in 1..{MAX_BEST_OF}")
    if sampling.return_k_alternatives > MAX_K_ALTERNATIVES:
        raise _fail(f"parameters.return_k_alternatives must be in 0..{MAX_K_ALTERNATIVES}")

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
                      return_full_text=_opt(raw, "return_full_text", bool, False), truncate=truncate,
                      merged_adapters=merged_adapters,
                      response_format=parse_response_format(raw.get("response_format")))


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


# ---- cancels ---------------------------------------------------------------------------------------
# A cancel message (docs/protocol.md, "Cancel") names one job: body {"v": 1, "id": <job id>}, in either
# content type, published to the cancel exchange. Its message_id is the job id too.

def encode_cancel(job_id: str, content_type: str = MSGPACK) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": job_id}, content_type)


def decode_cancel(body: bytes, content_type: str | None, message_id: str | None, limits: Limits) -> str:
    """The job id a cancel message names: its body's `id`, else its `message_id`. Raises
    ProtocolError (validation) when it names none, or one longer than the id limit."""
    job_id: Any = None
    if len(body) <= limits.max_body_bytes:
        try:
            decoded = decode(body, content_type)
        except ProtocolError:
            decoded = None
        if isinstance(decoded, dict):
            job_id = decoded.get("id")
    if job_id is None:
        job_id = message_id
    if not isinstance(job_id, str) or not job_id:
        raise _fail("a cancel message names its job in body.id or message_id")
    if len(job_id) > limits.max_id_length:
        raise _fail(f"cancelled job id longer than {limits.max_id_length}")
    return job_id


# ---- replies ---------------------------------------------------------------------------------------
# One typed model for both sides: the worker builds these and sends `to_wire()`, the client reads
# them back with `decode_reply`. Each reply's `id` is its job's id; `KIND` is its AMQP `type`.

def _malformed(kind: str, e: Exception) -> ProtocolError:
    return _fail(f"malformed {kind} reply: {type(e).__name__}: {e}")


def _scored_to_wire(t: ScoredToken) -> dict[str, Any]:
    """A prompt token (`details.prefill`) or an alternative token: LoRAX's InputToken map."""
    return {"id": t.token_id, "text": t.text, "logprob": t.logprob}


def _scored_from_wire(t: dict[str, Any]) -> ScoredToken:
    return ScoredToken(token_id=t["id"], text=t["text"], logprob=t.get("logprob"))


@dataclass(frozen=True)
class Token:
    """One generated token: streamed in a `token` reply, or listed in a result's details (with
    `details: true`). `index` counts from 0. LoRAX's Token: `skipped` (speculative decoding) is
    always false here."""

    index: int
    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    alternative_tokens: tuple[ScoredToken, ...] | None = None  # with return_k_alternatives

    @classmethod
    def of(cls, event: TokenEvent) -> Token:
        return cls(event.index, event.token_id, event.text, event.logprob, event.special, event.alternatives)

    def to_wire(self) -> dict[str, Any]:
        """The token map (its index is the reply's, or its place in the list)."""
        out = {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special,
               "skipped": False}
        if self.alternative_tokens is not None:
            out["alternative_tokens"] = [_scored_to_wire(a) for a in self.alternative_tokens]
        return out

    @classmethod
    def from_wire(cls, index: int, token: dict[str, Any]) -> Token:
        alternatives = token.get("alternative_tokens")
        return cls(index=index, id=token["id"], text=token["text"], logprob=token.get("logprob"),
                   special=bool(token.get("special", False)),
                   alternative_tokens=None if alternatives is None else
                   tuple(_scored_from_wire(a) for a in alternatives))


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
class BestOfSequence:
    """One of the other sequences of a `best_of` job (LoRAX's BestOfSequence)."""

    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: tuple[ScoredToken, ...] = ()
    tokens: tuple[Token, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"generated_text": self.generated_text, "finish_reason": self.finish_reason,
                "generated_tokens": self.generated_tokens, "seed": self.seed,
                "prefill": [_scored_to_wire(t) for t in self.prefill],
                "tokens": [t.to_wire() for t in self.tokens]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> BestOfSequence:
        return cls(generated_text=d["generated_text"], finish_reason=d["finish_reason"],
                   generated_tokens=d["generated_tokens"], seed=d.get("seed"),
                   prefill=tuple(_scored_from_wire(t) for t in d.get("prefill") or ()),
                   tokens=tuple(Token.from_wire(i, t) for i, t in enumerate(d.get("tokens") or ())))


@dataclass(frozen=True)
class Details:
    """A result's details, LoRAX's Details plus what v1 always had. `tokens` is empty unless the job
    asked for `details` (or `decoder_input_details`), `prefill` unless it asked for
    `decoder_input_details`; `skipped_tokens` is always 0 (no speculative decoding)."""

    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    tokens: tuple[Token, ...] = ()
    prefill: tuple[ScoredToken, ...] = ()
    best_of_sequences: tuple[BestOfSequence, ...] | None = None  # only with best_of > 1


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
                                   "generated_tokens": d.generated_tokens, "seed": d.seed,
                                   "skipped_tokens": 0, "prefill": [_scored_to_wire(t) for t in d.prefill],
                                   "tokens": [t.to_wire() for t in d.tokens]}
        if d.best_of_sequences is not None:
            details["best_of_sequences"] = [b.to_wire() for b in d.best_of_sequences]
        t = self.timings
        return {"v": PROTOCOL_VERSION, "id": self.id, "generated_text": self.generated_text,
                "details": details, "adapter_id": self.adapter_id,
                "timings": {"queue_ms": round(t.queue_ms, 3), "adapter_load_ms": round(t.adapter_load_ms, 3),
                            "ttft_ms": round(t.ttft_ms, 3), "total_ms": round(t.total_ms, 3)}}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> GenerationResult:
        try:
            d, t = body["details"], body.get("timings") or {}
            best_of = d.get("best_of_sequences")
            return cls(
                id=body["id"], generated_text=body["generated_text"],
                details=Details(finish_reason=d["finish_reason"], prompt_tokens=d["prompt_tokens"],
                                generated_tokens=d["generated_tokens"], seed=d.get("seed"),
                                tokens=tuple(Token.from_wire(i, tok) for i, tok in enumerate(d.get("tokens") or ())),
                                prefill=tuple(_scored_from_wire(tok) for tok in d.get("prefill") or ()),
                                best_of_sequences=None if best_of is None else
                                tuple(BestOfSequence.from_wire(b) for b in best_of)),
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
