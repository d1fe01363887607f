"""A job inside the worker: its deliveries, its state while collected or running, and its
translation to the engine's request and back to the wire's reply."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage

from consumer import settlement
from consumer.protocol import BestOfSequence, Details, GenerationResult, Job, Token
from consumer.publisher import Address
from engine.lease import Lease
from engine.request import AdapterRef, Completion, GenerationRequest


@dataclass(eq=False)
class Delivery:
    """One AMQP delivery of a job (a job may be delivered again while it runs)."""

    message: AbstractIncomingMessage
    job: Job
    received: float  # time.time()

    @property
    def attempts(self) -> int:
        """Attempts at this job before this delivery (consumer.settlement.attempts)."""
        return settlement.attempts(self.message.headers)

    @property
    def alive(self) -> bool:
        try:
            return not self.message.channel.is_closed
        except aiormq.exceptions.ChannelInvalidStateError:
            return False

    @property
    def address(self) -> Address:
        return Address.of(self.job)


@dataclass(eq=False)
class InflightJob:
    """A job collected or running on the engine, with every delivery waiting for its outcome."""

    request: GenerationRequest
    deliveries: list[Delivery]
    log: Any  # structlog logger bound to the job
    lease: Lease | None = None  # its adapter, prefetched on arrival, until the engine holds it
    batch_id: str | None = None
    tail: asyncio.Task | None = field(default=None, repr=False)  # replies publish in this order

    @property
    def job(self) -> Job:
        return self.deliveries[0].job

    def release_lease(self) -> None:
        """Once submitted (the engine then holds the adapter itself) or dropped unsubmitted."""
        if self.lease is not None:
            self.lease.release()


def to_request(job: Job, default_adapter_source: str, arrival: float) -> GenerationRequest:
    p = job.parameters
    source = p.adapter_source or default_adapter_source
    adapter = None if p.adapter_id is None else AdapterRef(id=p.adapter_id, source=source, api_token=p.api_token)
    if p.merged_adapters is not None:
        adapter = AdapterRef.merged(p.merged_adapters, source, p.api_token)
    return GenerationRequest(
        id=job.id, params=p.sampling, prompt=job.inputs,
        messages=None if job.messages is None else [dict(m) for m in job.messages],
        adapter=adapter,
        deadline=None if job.deadline_ms is None else job.deadline_ms / 1000.0,
        arrival_time=arrival, truncate=p.truncate, response_format=p.response_format)


def to_result(job: Job, c: Completion) -> GenerationResult:
    """The reply to a finished job: `return_full_text` prepends the inputs (to the other `best_of`
    sequences too), tokens only with `details`, prompt tokens only with `decoder_input_details`."""
    p = job.parameters
    prefix = job.inputs if p.return_full_text and job.inputs else ""
    tokens = tuple(Token.of(t) for t in c.tokens) if p.details else ()
    others = None if c.best_of_sequences is None else tuple(
        BestOfSequence(generated_text=prefix + o.text, finish_reason=o.finish_reason,
                       generated_tokens=o.generated_tokens, seed=o.seed, prefill=o.prefill,
                       tokens=tuple(Token.of(t) for t in o.tokens) if p.details else ())
        for o in c.best_of_sequences)
    return GenerationResult(
        id=job.id, generated_text=prefix + c.text, timings=c.timings, adapter_id=job.adapter_id,
        details=Details(finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                        generated_tokens=c.generated_tokens, seed=c.seed, tokens=tokens,
                        prefill=c.prefill if p.decoder_input_details else (), best_of_sequences=others))
