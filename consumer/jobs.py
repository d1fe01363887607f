"""A job inside the worker: its deliveries, its state while collected or running, and its
translation to the engine's request and back to the wire's reply."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage

from consumer import protocol
from consumer.protocol import Details, GenerationResult, Job, Token
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
    def count(self) -> int:
        """Earlier deliveries that ended without an ack (quorum queues' x-delivery-count)."""
        raw = (self.message.headers or {}).get(protocol.HEADER_DELIVERY_COUNT, 0)
        try:
            return int(raw) if isinstance(raw, int | str | bytes) else 0
        except ValueError:
            return 0

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
    adapter = None if p.adapter_id is None else AdapterRef(
        id=p.adapter_id, source=p.adapter_source or default_adapter_source, api_token=p.api_token)
    return GenerationRequest(
        id=job.id, params=p.sampling, prompt=job.inputs,
        messages=None if job.messages is None else [dict(m) for m in job.messages],
        adapter=adapter,
        deadline=None if job.deadline_ms is None else job.deadline_ms / 1000.0,
        arrival_time=arrival)


def to_result(job: Job, c: Completion) -> GenerationResult:
    text = job.inputs + c.text if job.parameters.return_full_text and job.inputs else c.text
    tokens = None
    if job.parameters.details:
        tokens = tuple(Token(t.index, t.token_id, t.text, t.logprob) for t in c.tokens)
    return GenerationResult(
        id=job.id, generated_text=text, timings=c.timings, adapter_id=job.adapter_id,
        details=Details(finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                        generated_tokens=c.generated_tokens, seed=c.seed, tokens=tokens))
