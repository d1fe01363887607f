"""The gateway's AMQP side: one robust connection, one confirm channel, one reply queue per process,
and the jobs in flight on it, told apart by correlation id.

    submit(body)        publish a job (mandatory, persistent, x-deadline-ms); a PendingJob back
    next(job)           its next reply: a TokenReply, the GenerationResult, or a GatewayError
                        raised for an error reply or at its deadline
    forget(job)         the caller is gone: late replies are dropped, and a job still waiting for
                        its final reply is cancelled (consumer/cancel.py)

After the broker connection comes back (aio-pika's robust connection redeclares the reply queue
and consumes it again), every job still in flight is published again under its job id: a reply
sent while the reply queue was gone is lost, and the worker answers a job id it already finished
from its result cache, so the caller still gets exactly one answer (duplicates are dropped here).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError

from consumer import cancel, protocol
from consumer.gateway.errors import UNAVAILABLE, GatewayError

log = structlog.get_logger("loraq.gateway")

WORKERS_MAX_AGE_S = 1.0  # /health and timeouts read the jobs queue's consumer count at most this stale


@dataclass(eq=False)
class PendingJob:
    """One job in flight: its replies in arrival order, tokens de-duplicated by index."""

    job_id: str
    correlation_id: str
    stream: bool
    deadline: float  # time.monotonic() after which the caller stops waiting
    message: aio_pika.Message  # kept to publish it again after a reconnect
    replies: asyncio.Queue[protocol.Reply] = field(default_factory=asyncio.Queue)
    next_index: int = 0  # tokens below it were seen (a job run again streams them again)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class JobTracker:
    def __init__(self, url: str, topology: protocol.Topology, *,
                 content_type: str = protocol.MSGPACK,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.url = url
        self.topology = topology
        self.content_type = protocol.normalize_content_type(content_type)
        self.name = f"loraq-gateway@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.reply_queue = f"loraq.gateway.reply.{uuid.uuid4().hex}"
        self._on_reconnected = on_reconnect
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._pending: dict[str, PendingJob] = {}
        self._workers: tuple[float, int | None] = (0.0, None)  # (monotonic time, consumer count)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": self.name})
        try:
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            # Declared here too (as the worker does) so that a job published before any worker
            # started is unroutable (503), not a channel-closing NOT_FOUND.
            self._exchange = await channel.declare_exchange(
                self.topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
            # A named queue, not amq.rabbitmq.reply-to: the robust connection redeclares and
            # consumes it again after a reconnect. exclusive + auto_delete: gone with this process.
            queue = await channel.declare_queue(self.reply_queue, exclusive=True, auto_delete=True)
            await queue.consume(self._on_reply, no_ack=True)
            self._connection.reconnect_callbacks.add(self._on_reconnect)
        except BaseException:
            await self._connection.close()
            raise

    async def close(self) -> None:
        self._pending.clear()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @property
    def connected(self) -> bool:
        c = self._connection
        return c is not None and not c.is_closed and c.connected.is_set()

    @property
    def inflight(self) -> int:
        return len(self._pending)

    # ---- jobs ------------------------------------------------------------------------------------

    async def submit(self, body: dict, *, adapter_id: str | None, timeout_s: float) -> PendingJob:
        """Publish one job (a `protocol.job_body` map). Raises GatewayError: unavailable when no
        queue takes it or the broker is unreachable, overloaded when the broker refuses it."""
        if self._exchange is None or not self.connected:
            raise GatewayError(UNAVAILABLE, "the gateway has no broker connection (reconnecting)")
        job_id = str(uuid.uuid4())
        cid = uuid.uuid4().hex
        headers: dict[str, Any] = {protocol.HEADER_DEADLINE: int((time.time() + timeout_s) * 1000)}
        if adapter_id:  # what workers started with --affinity hash on
            headers[protocol.HEADER_ADAPTER_ID] = adapter_id
        message = aio_pika.Message(
            protocol.encode(body, self.content_type), content_type=self.content_type,
            message_id=job_id, correlation_id=cid, reply_to=self.reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers,
            timestamp=datetime.now(UTC))
        job = PendingJob(job_id, cid, bool(body.get("stream")), time.monotonic() + timeout_s, message)
        self._pending[cid] = job  # before publishing: a fast reply must find it
        try:
            await self._exchange.publish(message, self.topology.routing_key, mandatory=True)
        except PublishError:
            self._pending.pop(cid, None)
            raise GatewayError(UNAVAILABLE, f"no queue is bound to exchange {self.topology.exchange!r} "
                                            f"with routing key {self.topology.routing_key!r}: "
                                            f"no worker has started") from None
        except DeliveryError:  # Basic.Nack, e.g. a full queue with overflow=reject-publish
            self._pending.pop(cid, None)
            raise GatewayError(protocol.OVERLOADED, "the broker refused the job") from None
        except (AMQPError, ConnectionError, RuntimeError) as e:  # connection lost while publishing
            self._pending.pop(cid, None)
            raise GatewayError(UNAVAILABLE, f"publishing failed: {type(e).__name__}") from None
        except BaseException:
            self._pending.pop(cid, None)
            raise
        return job

    async def next(self, job: PendingJob,
                   wait_s: float | None = None) -> protocol.TokenReply | protocol.GenerationResult | None:
        """The job's next reply; None when `wait_s` passed first. Raises GatewayError for an error
        reply, and at the job's deadline (unavailable when no worker consumes the jobs queue, else
        deadline_exceeded)."""
        remaining = job.remaining()
        wait = remaining if wait_s is None else min(wait_s, remaining)
        try:
            reply = await asyncio.wait_for(job.replies.get(), max(0.0, wait))
        except TimeoutError:
            if wait_s is not None and wait_s < remaining:
                return None
            self.forget(job)
            raise await self._timeout_error(job) from None
        if isinstance(reply, protocol.ErrorReply):
            raise GatewayError.from_reply(reply)
        return reply

    async def result(self, job: PendingJob) -> protocol.GenerationResult:
        """The job's result (tokens skipped). Raises as `next`."""
        while True:
            reply = await self.next(job)
            if isinstance(reply, protocol.GenerationResult):
                return reply

    def forget(self, job: PendingJob) -> None:
        if self._pending.pop(job.correlation_id, None) is not None and self._connection is not None:
            cancel.send(self._connection, self.topology, job.job_id, self.content_type)  # no final reply: abandoned

    async def _timeout_error(self, job: PendingJob) -> GatewayError:
        if await self.workers() == 0:
            return GatewayError(UNAVAILABLE, f"no worker is consuming queue {self.topology.queue!r}: "
                                             f"job {job.job_id} waited for one and expired")
        return GatewayError(protocol.DEADLINE_EXCEEDED, f"job {job.job_id} got no answer within its "
                                                        f"deadline")

    async def workers(self) -> int | None:
        """Consumers of the jobs queue (0 when it does not exist; None when the broker cannot be
        asked), read at most WORKERS_MAX_AGE_S ago."""
        at, count = self._workers
        if time.monotonic() - at < WORKERS_MAX_AGE_S:
            return count
        count = None
        if self.connected and self._connection is not None:
            try:  # a throwaway channel: a passive declare of a missing queue closes its channel
                channel = await self._connection.channel()
                try:
                    queue = await channel.declare_queue(self.topology.queue, passive=True)
                    count = queue.declaration_result.consumer_count
                finally:
                    if not channel.is_closed:
                        await channel.close()
            except aio_pika.exceptions.ChannelNotFoundEntity:
                count = 0
            except (AMQPError, ConnectionError, RuntimeError):
                count = None
        self._workers = (time.monotonic(), count)
        return count

    # ---- replies and reconnects ------------------------------------------------------------------

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        job = self._pending.get(message.correlation_id or "")
        if job is None:  # its caller is gone, or a duplicate final of a job run twice
            return
        try:
            reply = protocol.decode_reply(message.body, message.content_type, message.type)
        except protocol.ProtocolError as e:  # only a worker publishes here: fail the job now
            log.warning("reply_malformed", job_id=job.job_id, error=str(e))
            reply = protocol.ErrorReply(job.job_id, protocol.INTERNAL, f"malformed reply: {e}")
        if isinstance(reply, protocol.TokenReply):
            if not job.stream or reply.token.index < job.next_index:
                return
            job.next_index = reply.token.index + 1
        else:
            self._pending.pop(job.correlation_id, None)
        job.replies.put_nowait(reply)

    async def _on_reconnect(self, *_: Any) -> None:
        if self._on_reconnected is not None:
            self._on_reconnected()
        jobs = list(self._pending.values())
        log.warning("amqp_reconnected", inflight=len(jobs))
        for job in jobs:
            if self._exchange is None or job.remaining() <= 0:
                continue
            try:
                await self._exchange.publish(job.message, self.topology.routing_key, mandatory=True)
            except (AMQPError, ConnectionError, RuntimeError) as e:
                log.warning("job_republish_failed", job_id=job.job_id, error=type(e).__name__)
