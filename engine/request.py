"""The engine's public value types: what goes in (`GenerationRequest`) and what comes out
(`TokenEvent`, `Completion`, `GenerationFailure`).

This module imports no torch: the consumer builds requests and reads outcomes with it.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union


class ErrorType(str, enum.Enum):
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
    """Per-request decoding parameters (LoRAX / TGI names). `do_sample=False` is greedy."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # wire `details: true`: per-token ids and logprobs in the result
    ignore_eos: bool = False  # benchmarks only (not on the wire): always run to max_new_tokens

    def __post_init__(self) -> None:
        """The one check of these values (the wire protocol checks only their JSON types). Raises
        ValueError starting with the field's name: error replies quote it as `parameters.<it>`."""
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not 0.0 < self.temperature < math.inf:  # NaN fails too
            raise ValueError("temperature must be finite and > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        for name in ("top_p", "typical_p"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError("repetition_penalty must be finite and > 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("seed must be in 0..2**64-1")

    @property
    def greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request uses. `id` is hostile input until the adapter source checks it."""

    id: str
    source: str = "local"  # "local" | "hub"
    api_token: str | None = field(default=None, repr=False)  # never logged

    @property
    def key(self) -> str:
        """Cache key: the same id from two sources is two adapters."""
        return f"{self.source}:{self.id}"


@dataclass
class GenerationRequest:
    """One generation job. Exactly one of `prompt`, `messages`, `prompt_token_ids` is set."""

    id: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: list[dict] | None = None  # chat: the model's chat template is applied
    prompt_token_ids: list[int] | None = None
    adapter: AdapterRef | None = None  # None: the base model alone
    deadline: float | None = None  # absolute time.time(); past it the request is never computed
    arrival_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("exactly one of prompt, messages, prompt_token_ids must be set")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, streamed in order (`index` counts from 0)."""

    request_id: str
    index: int
    token_id: int
    text: str
    logprob: float | None = None


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


@dataclass(frozen=True)
class GenerationFailure:
    request_id: str
    error: EngineError


Outcome = Union[Completion, GenerationFailure]
OnToken = Callable[[TokenEvent], None]
OnFinish = Callable[[Outcome], None]
