"""Wire protocol v1 (docs/protocol.md): the only package that knows the wire format.

Backend apps (through `consumer.client`) and the worker both use it. It imports neither torch nor
transformers nor aio-pika: it turns bytes + AMQP properties into a validated `Job`, and the typed
replies (`GenerationResult`, `TokenReply`, `ErrorReply`) into maps and back. Every bad input raises
`ProtocolError`; nothing else escapes `decode_job`. It checks the wire's JSON types and size limits;
the sampling values themselves are checked by the engine's `SamplingParams`, in one place.

Two dialects share the format: a body with `"v": 1` is loraq's v1, a body without `v` is a LoRAX
`/generate` body and keeps LoRAX's defaults and sampling rule (docs/lorax.md lists the fields).

Import from here (`from consumer.protocol import Job`); the modules, one noun each:
errors (ProtocolError, error_type values), codec (content types, encode/decode), headers (AMQP
header names), names (Topology), limits (Limits), parameters (a job's `parameters`), jobs (Job,
decode_job, job_body), cancels (cancel messages), replies (the typed replies, decode_reply).
"""

from __future__ import annotations

from consumer.protocol.cancels import decode_cancel, encode_cancel
from consumer.protocol.codec import (
    CONTENT_TYPES,
    JSON,
    MSGPACK,
    PROTOCOL_VERSION,
    decode,
    encode,
    normalize_content_type,
)
from consumer.protocol.errors import (
    ADAPTER_INVALID,
    ADAPTER_NOT_FOUND,
    DEADLINE_EXCEEDED,
    ERROR_TYPES,
    INTERNAL,
    OVERLOADED,
    PROMPT_TOO_LONG,
    VALIDATION,
    ProtocolError,
)
from consumer.protocol.headers import (
    HEADER_ADAPTER_ID,
    HEADER_DEADLINE,
    HEADER_DEATHS,
    HEADER_DELIVERY_COUNT,
    HEADER_ERROR,
    HEADER_ERROR_CODE,
    HEADER_RETRIES,
)
from consumer.protocol.jobs import (
    ROLES,
    Job,
    decode_job,
    encode_job,
    job_body,
    job_id_of,
    parse_body,
    parse_deadline,
    parse_messages,
)
from consumer.protocol.limits import Limits
from consumer.protocol.names import Topology
from consumer.protocol.parameters import (
    ADAPTER_SOURCES,
    DEFAULT_JSON_SCHEMA,
    MAX_BEST_OF,
    MAX_K_ALTERNATIVES,
    MAX_MERGED_ADAPTERS,
    PARAMETER_NAMES,
    RESPONSE_FORMAT_TYPES,
    SAMPLING_FIELDS,
    GenerateParameters,
    Parameters,
    merged_adapters_to_wire,
    parse_merged_adapters,
    parse_parameters,
    parse_response_format,
    response_format_to_wire,
)
from consumer.protocol.replies import (
    FINISH_REASONS,
    REPLY_ERROR,
    REPLY_RESULT,
    REPLY_TOKEN,
    REPLY_TYPES,
    BestOfSequence,
    Details,
    ErrorReply,
    FinalReply,
    GenerationResult,
    Reply,
    Token,
    TokenReply,
    decode_reply,
)

# the engine's value types that the protocol's models carry (engine.request imports no torch)
from engine.request import MergedAdapters, ResponseFormat, SamplingParams, ScoredToken, Timings

__all__ = [
    # errors
    "ProtocolError", "ERROR_TYPES", "VALIDATION", "ADAPTER_NOT_FOUND", "ADAPTER_INVALID", "PROMPT_TOO_LONG",
    "DEADLINE_EXCEEDED", "OVERLOADED", "INTERNAL",
    # codec
    "PROTOCOL_VERSION", "MSGPACK", "JSON", "CONTENT_TYPES", "normalize_content_type", "encode", "decode",
    # headers
    "HEADER_DEADLINE", "HEADER_ERROR_CODE", "HEADER_ERROR", "HEADER_DELIVERY_COUNT", "HEADER_ADAPTER_ID",
    "HEADER_DEATHS", "HEADER_RETRIES",
    # names, limits
    "Topology", "Limits",
    # parameters
    "Parameters", "GenerateParameters", "parse_parameters", "PARAMETER_NAMES", "SAMPLING_FIELDS", "ADAPTER_SOURCES",
    "MAX_MERGED_ADAPTERS", "MAX_BEST_OF", "MAX_K_ALTERNATIVES", "parse_merged_adapters", "merged_adapters_to_wire",
    "RESPONSE_FORMAT_TYPES", "DEFAULT_JSON_SCHEMA", "parse_response_format", "response_format_to_wire",
    # jobs
    "Job", "ROLES", "decode_job", "parse_body", "parse_messages", "parse_deadline", "job_id_of", "job_body",
    "encode_job",
    # cancels
    "encode_cancel", "decode_cancel",
    # replies
    "REPLY_RESULT", "REPLY_TOKEN", "REPLY_ERROR", "REPLY_TYPES", "FINISH_REASONS", "Token", "TokenReply",
    "BestOfSequence", "Details", "GenerationResult", "ErrorReply", "Reply", "FinalReply", "decode_reply",
    # engine value types
    "MergedAdapters", "ResponseFormat", "SamplingParams", "ScoredToken", "Timings",
]
