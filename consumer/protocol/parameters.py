"""A job's `parameters`, typed: adapter choice, sampling values, LoRAX's `merged_adapters` and
`response_format`. Wire types and size limits are checked here, sampling values by the engine's
SamplingParams. Also the JSON-type helpers that job decoding shares, and `GenerateParameters`, the
keywords a client call takes for them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from consumer.protocol.errors import _fail
from consumer.protocol.limits import Limits
from engine.request import MergedAdapters, ResponseFormat, SamplingParams

ADAPTER_SOURCES = ("local", "hub")
MAX_MERGED_ADAPTERS = 16  # adapters one merged_adapters may name: each is read from source to build it
MAX_BEST_OF = 4  # sequences one job may ask for: each costs a whole generation
MAX_K_ALTERNATIVES = 100  # return_k_alternatives: each is decoded once per generated token

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
PARAMETER_NAMES = ("adapter_id", "adapter_source", "api_token", "merged_adapters", *SAMPLING_FIELDS, "fill_context",
                   "return_full_text", "truncate", "watermark", "apply_chat_template", "response_format")


class GenerateParameters(TypedDict, total=False):
    """The wire's parameters (PARAMETER_NAMES, docs/protocol.md "Parameters") as typed keywords of a
    client call (`Client.generate(..., **parameters)`). Every key is optional and None leaves it out,
    so the wire's default applies; `merged_adapters` and `response_format` take the engine's value
    types (a `response_format` map is sent as given), and a string `stop` is one stop sequence."""

    adapter_id: str | None
    adapter_source: str | None
    api_token: str | None
    merged_adapters: MergedAdapters | None
    max_new_tokens: int | None
    do_sample: bool | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    typical_p: float | None
    repetition_penalty: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    stop: Sequence[str] | None
    seed: int | None
    best_of: int | None
    details: bool | None
    decoder_input_details: bool | None
    return_k_alternatives: int | None
    ignore_eos_token: bool | None
    fill_context: bool | None
    return_full_text: bool | None
    truncate: int | None
    watermark: bool | None
    apply_chat_template: bool | None
    response_format: ResponseFormat | Mapping[str, Any] | None


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
    context allows: the worker's limit, and the engine stops at the context's end) apply; a v1 body
    asks for that default with `fill_context` (OpenAI's and vLLM's max_tokens unset)."""
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
    fill_context = _opt(raw, "fill_context", bool, False)  # v1's way to ask for LoRAX's default
    if lorax or fill_context:
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
