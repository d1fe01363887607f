"""One request's life inside the engine: its tokens, KV blocks, adapter slot, sampling and timings."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.lease import Lease
from engine.request import GenerationRequest, OnFinish, OnToken, ScoredToken, TokenEvent

if TYPE_CHECKING:
    from engine.detokenizer import Detokenizer
    from engine.grammar import GrammarMatcher
    from engine.sampler import SamplingState

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds KV blocks (and an adapter slot when it has an adapter)
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    sampling: SamplingState | None = None  # None only in scheduler tests
    detokenizer: Detokenizer | None = None
    grammar: GrammarMatcher | None = None  # its response_format's matcher: masks the tokens it may choose
    on_token: OnToken | None = None
    on_finish: OnFinish | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in its blocks: the runner advances it, freeing resets it
    adapter_slot: int = -1  # device slot of its adapter while running; -1: base model
    prefetch: Lease | None = None  # holds its adapter in the host tier until its first admission
    adapter_generation: int = 0  # the adapter version the store held when the request arrived
    adapter_load_ms: float = 0.0  # the load it waited for (set at its first admission)
    events: list[TokenEvent] = field(default_factory=list)  # kept only with params.logprobs
    prefill: tuple[ScoredToken, ...] | None = None  # its prompt scored (params.prompt_logprobs), once
    prompt_scores: list[float] = field(default_factory=list)  # logprobs of prompt tokens 1.. so far (chunked)
    finish_reason: str | None = None
    num_preemptions: int = 0
    admitted_at: float | None = None  # time.time() of its first admission
    first_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.id

    @property
    def adapter_key(self) -> str | None:
        """Scheduling key: one queue per adapter, None for the base model."""
        return self.request.adapter.key if self.request.adapter else None

    @property
    def arrival_time(self) -> float:
        return self.request.arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: 1 while decoding, more while its prompt is prefilled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Everything is cached but its newest token, an output: it runs one token a step."""
        return self.num_uncomputed_tokens == 1 and len(self.token_ids) > self.num_prompt_tokens

    @property
    def max_new_tokens(self) -> int:
        return self.request.params.max_new_tokens
