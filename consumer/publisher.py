"""What the worker sends to the broker: replies (each confirmed), retry and dead-letter copies of
jobs, and the acks / requeues that settle deliveries. A dead channel or connection is reported
(False, or a log line), never raised: the broker redelivers that job, and the result cache answers
it. A job's `api_token` never leaves in a dead-letter copy (`without_api_token`); its retry copy
is the job itself, on its way back to the jobs queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustChannel, DeliveryMode

from consumer import protocol
from consumer.protocol import Job, ProtocolError, Reply, Topology
from consumer.settlement import REQUEUE_METHOD, Action, Decision, Failure

log = structlog.get_logger(__name__)

# a channel or connection that died under us: the delivery is gone, the broker redelivers it
DEAD_CHANNEL = (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError,
                ConnectionError, asyncio.TimeoutError)
PUBLISH_TIMEOUT_S = 30.0
# set by the broker on a delivery: a retry copy is a new message and starts without them
BROKER_HEADERS = (protocol.HEADER_DELIVERY_COUNT, "x-acquired-count", protocol.HEADER_DEATHS,
                  "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                  "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


def without_api_token(body: bytes, content_type: str | None) -> bytes:
    """`body` with `parameters.api_token` removed, re-encoded in its own content type. A body that
    holds no token, or cannot be decoded (so no token can be read from it either), is returned as
    it is; one that decodes but cannot be encoded back is dropped (b"") rather than kept whole."""
    try:
        job = protocol.decode(body, content_type)
    except ProtocolError:
        return body
    params = job.get("parameters") if isinstance(job, dict) else None
    if not isinstance(params, dict) or "api_token" not in params:
        return body
    clean = {**job, "parameters": {k: v for k, v in params.items() if k != "api_token"}}
    try:
        return protocol.encode(clean, content_type or "")
    except (ProtocolError, TypeError, ValueError, OverflowError):
        return b""


@dataclass(frozen=True)
class Address:
    """Where a job's replies go: its `reply_to` queue, else the results exchange (routing key by
    adapter)."""

    reply_to: str | None
    correlation_id: str | None
    content_type: str
    adapter_id: str | None = None

    @classmethod
    def of(cls, job: Job) -> Address:
        return cls(job.reply_to, job.correlation_id, job.content_type, job.adapter_id)


class Publisher:
    def __init__(self, channel: AbstractRobustChannel, topology: Topology, dlx: AbstractExchange,
                 results: AbstractExchange) -> None:
        self._channel = channel
        self._topology = topology
        self._dlx = dlx
        self._results = results

    async def reply(self, to: Address, reply: Reply) -> bool:
        """Publish one reply and wait for the broker's confirm. To reply_to (mandatory: an
        unroutable reply is logged and counted as answered: its client is gone), else to the
        results exchange. False when it could not be published (the job must not be acked)."""
        message = aio_pika.Message(
            protocol.encode(reply.to_wire(), to.content_type), content_type=to.content_type,
            correlation_id=to.correlation_id, type=reply.KIND,
            delivery_mode=DeliveryMode.NOT_PERSISTENT if to.reply_to else DeliveryMode.PERSISTENT)
        try:
            if to.reply_to:
                await self._channel.default_exchange.publish(
                    message, routing_key=to.reply_to, mandatory=True, timeout=PUBLISH_TIMEOUT_S)
            else:
                await self._results.publish(
                    message, routing_key=self._topology.result_routing_key(to.adapter_id),
                    mandatory=False, timeout=PUBLISH_TIMEOUT_S)
            return True
        except aiormq.exceptions.PublishError:
            log.warning("reply_unroutable", job_id=reply.id, reply_to=to.reply_to, reply_type=reply.KIND)
            return True
        except DEAD_CHANNEL as e:
            log.warning("reply_publish_failed", job_id=reply.id, reply_type=reply.KIND,
                        error=type(e).__name__)
            return False

    async def retry(self, message: AbstractIncomingMessage, job: Job, decision: Decision) -> bool:
        """A copy of the job into the retry queue, which sends it back to the jobs exchange after
        `decision.delay_s` (its per-message TTL, cut short by the job's deadline). Its headers carry
        the retry count and the deadline as `x-deadline-ms` (its `expiration` is now the delay);
        the broker's delivery and death records start afresh. False when it was not confirmed."""
        headers = {k: v for k, v in (message.headers or {}).items() if k not in BROKER_HEADERS}
        headers[protocol.HEADER_RETRIES] = decision.retry
        delay_s = decision.delay_s
        if job.deadline_ms is not None:
            headers[protocol.HEADER_DEADLINE] = job.deadline_ms
            delay_s = min(delay_s, max(0.0, job.deadline_ms / 1000.0 - time.time()))
        keep = {protocol.HEADER_RETRIES, protocol.HEADER_DEADLINE, protocol.HEADER_ADAPTER_ID}

        def copy(headers: dict[str, Any]) -> aio_pika.Message:
            return aio_pika.Message(
                message.body, headers=headers, content_type=message.content_type,
                content_encoding=message.content_encoding, message_id=message.message_id,
                correlation_id=message.correlation_id, reply_to=message.reply_to,
                timestamp=message.timestamp, type=message.type, app_id=message.app_id,
                expiration=round(delay_s, 3), delivery_mode=DeliveryMode.PERSISTENT)

        try:
            try:
                await self._channel.default_exchange.publish(
                    copy(headers), routing_key=self._topology.retry_queue, mandatory=True,
                    timeout=PUBLISH_TIMEOUT_S)
            except (TypeError, ValueError):  # hostile headers that do not encode back: drop them
                await self._channel.default_exchange.publish(
                    copy({k: v for k, v in headers.items() if k in keep}),
                    routing_key=self._topology.retry_queue, mandatory=True, timeout=PUBLISH_TIMEOUT_S)
        except aiormq.exceptions.PublishError:  # no retry queue (deleted under us)
            log.warning("retry_unroutable", job_id=job.id, retry_queue=self._topology.retry_queue)
            return False
        except DEAD_CHANNEL as e:
            log.warning("retry_publish_failed", job_id=job.id, error=type(e).__name__)
            return False
        return True

    async def dead_letter(self, message: AbstractIncomingMessage, failure: Failure) -> bool:
        """A copy of the job as received (less its api_token) on the dead-letter exchange, the
        reason in its headers."""
        reason = {protocol.HEADER_ERROR_CODE: failure.error_type,
                  protocol.HEADER_ERROR: failure.message[:1000]}
        body = without_api_token(message.body, message.content_type)

        def copy(headers: dict[str, Any]) -> aio_pika.Message:
            return aio_pika.Message(
                body, headers=headers, content_type=message.content_type,
                content_encoding=message.content_encoding, message_id=message.message_id,
                correlation_id=message.correlation_id, reply_to=message.reply_to,
                timestamp=message.timestamp, type=message.type, app_id=message.app_id,
                delivery_mode=DeliveryMode.PERSISTENT)

        routing_key = message.routing_key or ""
        try:
            try:
                await self._dlx.publish(copy({**(message.headers or {}), **reason}), routing_key,
                                        mandatory=False, timeout=PUBLISH_TIMEOUT_S)
            except (TypeError, ValueError):  # hostile headers that do not encode back: drop them
                await self._dlx.publish(copy(reason), routing_key, mandatory=False,
                                        timeout=PUBLISH_TIMEOUT_S)
        except DEAD_CHANNEL as e:
            log.warning("dead_letter_failed", job_id=message.message_id, error=type(e).__name__)
            return False
        return True

    @staticmethod
    async def ack(message: AbstractIncomingMessage, job_id: str | None) -> None:
        try:
            await message.ack()
        except DEAD_CHANNEL as e:  # includes MessageProcessError: never ack twice
            log.warning("ack_failed", job_id=job_id, error=type(e).__name__)

    @staticmethod
    async def requeue(message: AbstractIncomingMessage, job_id: str | None, action: Action) -> None:
        """Back to the queue, the way settlement.REQUEUE_METHOD sends `action` (RETURN: nack,
        uncounted from RabbitMQ 4.3; REJECT: reject, always counted)."""
        method = REQUEUE_METHOD[action]
        try:
            await getattr(message, method)(requeue=True)
        except DEAD_CHANNEL as e:
            log.warning(f"{method}_failed", job_id=job_id, error=type(e).__name__)
