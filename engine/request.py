"""The engine's public value types: what goes in (`GenerationRequest`) and what comes out
(`TokenEvent`, `Completion`, `GenerationFailure`).

This module imports no torch: the consumer builds requests and reads outcomes with it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ErrorType(enum.StrEnum):
    """Error classes of wire protocol v1 (`error_type`)."""

    VALIDATION = "validation"
    ADAPTER_NOT_FOUND = "adapter_not_found"
    ADAPTER_INVALID = "adapter_invalid"
    PROMPT_TOO_LONG = "prompt_too_long"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


class EngineError(Exception):
    """An error that fails one request (never the engine)."""

    def __init__(self, type: ErrorType, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.type = ErrorType(type)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (LoRAX / TGI names, docs/lorax.md). Greedy unless `do_sample`;
    `temperature` 0 is greedy whatever `do_sample` says. `SamplingParams.lorax(...)` applies LoRAX's
    rule instead: sampling whenever a warper is set."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0  # LoRAX's: minus penalty * count / tokens so far, per id seen
    presence_penalty: float = 0.0  # LoRAX's: minus penalty for every id seen (prompt + output)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # wire `details: true`: per-token ids and logprobs in the result
    return_k_alternatives: int = 0  # per generated token, this many most likely ids with logprobs
    prompt_logprobs: bool = False  # wire `decoder_input_details`: the prompt's tokens with logprobs
    best_of: int = 1  # > 1: that many sampled sequences, the most likely one answers
    ignore_eos: bool = False  # wire `ignore_eos_token`: run to max_new_tokens through end-of-sequence

    def __post_init__(self) -> None:
        """The one check of these values (the wire protocol checks only their JSON types). Raises
        ValueError starting with the field's name: error replies quote it as `parameters.<it>`."""
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not 0.0 <= self.temperature < math.inf:  # NaN fails too
            raise ValueError("temperature must be finite and >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        for name in ("top_p", "typical_p"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError("repetition_penalty must be finite and > 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("seed must be in 0..2**64-1")
        if self.return_k_alternatives < 0:
            raise ValueError("return_k_alternatives must be >= 0")
        if self.best_of < 1:
            raise ValueError("best_of must be >= 1")
        if self.best_of > 1 and self.greedy:
            raise ValueError("best_of > 1 needs sampling (do_sample, or a warper under LoRAX's rule) "
                             "and a temperature other than 0")
        if self.best_of > 1 and self.seed is not None:
            raise ValueError("seed must not be set when best_of > 1")

    @classmethod
    def lorax(cls, **values: Any) -> SamplingParams:
        """LoRAX's and TGI's rule (lorax_server/utils/tokens.py): sampling is on with `do_sample` or
        whenever a warper is set: a temperature other than 0 and 1, top_k, top_p < 1, typical_p < 1
        (temperature 0 is greedy all the same)."""
        t, top_p, typical_p = values.get("temperature"), values.get("top_p"), values.get("typical_p")
        warped = ((t is not None and t not in (0.0, 1.0)) or values.get("top_k") is not None
                  or (top_p is not None and top_p < 1.0) or (typical_p is not None and typical_p < 1.0))
        return cls(**{**values, "do_sample": bool(values.get("do_sample")) or warped})

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergedAdapters:
    """LoRAX's `merged_adapters`: one adapter merged from `ids` (all from the request's adapter
    source) with `weights`, by `merge_strategy` (the math: engine/adapter_merge.py). Defaults are
    LoRAX's: linear, density 0.0, total."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]
    merge_strategy: str = "linear"
    density: float = 0.0  # fraction of each tensor kept by ties / dare_*; unused by linear
    majority_sign_method: str = "total"  # ties / dare_ties sign election

    def __post_init__(self) -> None:
        """Raises ValueError starting with the field's name, like SamplingParams."""
        if not self.ids:
            raise ValueError("merged_adapters.ids must hold at least one adapter id")
        if any(not isinstance(i, str) or not i for i in self.ids):
            raise ValueError("merged_adapters.ids must be non-empty strings")
        if len(self.weights) != len(self.ids):
            raise ValueError(f"merged_adapters.weights must have as many entries as ids ({len(self.ids)}), "
                             f"got {len(self.weights)}")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError("merged_adapters.weights must be finite numbers")
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merged_adapters.merge_strategy must be one of {MERGE_STRATEGIES}")
        if not 0.0 <= self.density <= 1.0:  # NaN fails too
            raise ValueError("merged_adapters.density must be in [0, 1]")
        if self.density == 0.0 and self.merge_strategy != "linear":
            raise ValueError(f"merged_adapters.density must be > 0 with merge_strategy {self.merge_strategy!r} "
                             f"(0, the default, would prune every weight)")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise ValueError(f"merged_adapters.majority_sign_method must be one of {MAJORITY_SIGN_METHODS}")

    @property
    def digest(self) -> str:
        """64 bits of sha256 over the whole definition (ids in order, weights, strategy, density,
        sign method), as hex: what the merged adapter is cached under and DARE is seeded with."""
        definition = json.dumps([list(self.ids), list(self.weights), self.merge_strategy, self.density,
                                 self.majority_sign_method])
        return hashlib.sha256(definition.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request uses. `id` is hostile input until the adapter source checks it."""

    id: str
    source: str = "local"  # "local" | "hub"
    api_token: str | None = field(default=None, repr=False)  # never logged
    merge: MergedAdapters | None = None  # set: a merge of merge.ids from `source` (see `merged`)
    scope: str = ""  # set by the engine: a salted fingerprint of api_token where the source needs one (hub)

    @property
    def key(self) -> str:
        """Cache key: the same id from two sources is two adapters, and so is one hub id fetched
        with two tokens (a private adapter is never served to a job without its token)."""
        name = f"merge:{self.source}:{self.merge.digest}" if self.merge else f"{self.source}:{self.id}"
        return name + (f"#{self.scope}" if self.scope else "")

    @classmethod
    def merged(cls, merge: MergedAdapters, source: str = "local", api_token: str | None = None) -> AdapterRef:
        """The adapter merged from `merge`; its key cannot collide with a plain adapter's. One id is
        that adapter itself, its weight unused, as LoRAX loads it."""
        if len(merge.ids) == 1:
            return cls(id=merge.ids[0], source=source, api_token=api_token)
        return cls(id=f"merge:{merge.digest}", source=source, api_token=api_token, merge=merge)


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the generated text (wire `parameters.response_format`, engine/grammar.py):
    JSON valid against a JSON schema (`type` "json_schema", `value` the schema as JSON text), or
    text the regex `value` matches in full (`type` "regex"). Whether the schema or regex can be
    enforced is the engine's to say (a validation error)."""

    type: str
    value: str

    TYPES = ("json_schema", "regex")

    def __post_init__(self) -> None:
        if self.type not in self.TYPES:
            raise ValueError(f"response_format type must be one of {self.TYPES}")
        if not isinstance(self.value, str) or not self.value:
            raise ValueError("response_format needs a non-empty schema or pattern")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> ResponseFormat:
        """The schema as compact JSON text (the cache key of its compiled grammar). Key order is
        kept: the generated object's properties come in the order the schema lists them."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False))


@dataclass
class GenerationRequest:
    """One generation job. Exactly one of `prompt`, `messages`, `prompt_token_ids` is set."""

    id: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: list[dict] | None = None  # chat: the model's chat template is applied
    prompt_token_ids: list[int] | None = None
    adapter: AdapterRef | None = None  # None: the base model alone
    deadline: float | None = None  # absolute time.time(); past it the request fails, queued or running
    arrival_time: float = field(default_factory=time.time)
    truncate: int | None = None  # keep only the last `truncate` prompt tokens (LoRAX's `truncate`)
    response_format: ResponseFormat | None = None  # None: the text is unconstrained

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("exactly one of prompt, messages, prompt_token_ids must be set")
        if self.truncate is not None and self.truncate < 1:
            raise ValueError("truncate must be >= 1")


@dataclass(frozen=True)
class ScoredToken:
    """A token with its logprob: a prompt token (`logprob` None for the first, which nothing
    predicts) or one of a generated token's alternatives."""

    token_id: int
    text: str
    logprob: float | None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, streamed in order (`index` counts from 0)."""

    request_id: str
    index: int
    token_id: int
    text: str
    logprob: float | None = None
    special: bool = False  # one of the tokenizer's special tokens (its text is not in the output)
    alternatives: tuple[ScoredToken, ...] | None = None  # with params.return_k_alternatives


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    adapter_load_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True)
class Completion:
    """A finished generation as the engine reports it (the wire reply is consumer.protocol's)."""

    request_id: str
    text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    prompt_tokens: int
    generated_tokens: int
    timings: Timings
    adapter_id: str | None = None
    seed: int | None = None
    tokens: tuple[TokenEvent, ...] = ()  # only with params.logprobs
    token_ids: tuple[int, ...] = ()
    prefill: tuple[ScoredToken, ...] = ()  # only with params.prompt_logprobs
    best_of_sequences: tuple[Completion, ...] | None = None  # with params.best_of > 1: the others


@dataclass(frozen=True)
class GenerationFailure:
    request_id: str
    error: EngineError


Outcome = Completion | GenerationFailure
OnToken = Callable[[TokenEvent], None]
OnFinish = Callable[[Outcome], None]
