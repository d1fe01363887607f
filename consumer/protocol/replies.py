"""The typed replies, one model for both sides: the worker builds these and sends `to_wire()`, the
client reads them back with `decode_reply`. Each reply's `id` is its job's id; `KIND` is its AMQP
`type`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from consumer.protocol.codec import PROTOCOL_VERSION, decode
from consumer.protocol.errors import ERROR_TYPES, INTERNAL, ProtocolError, _fail
from engine.request import ScoredToken, Timings, TokenEvent

# AMQP `type` property of replies
REPLY_RESULT = "result"
REPLY_TOKEN = "token"
REPLY_ERROR = "error"
REPLY_TYPES = (REPLY_RESULT, REPLY_TOKEN, REPLY_ERROR)

FINISH_REASONS = ("length", "eos_token", "stop_sequence")


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
