"""Client for backend apps: publish a job (wire protocol v1), await its replies.

Imports aio-pika, msgpack and `consumer.protocol` only (no torch, no transformers), so a backend
app can install and use it alone:

    async with Client("amqp://guest:guest@127.0.0.1:5672/") as client:
        result = await client.generate("Hello", adapter_id="demo/pirate", max_new_tokens=32)
        print(result.generated_text, result.timings)
        verdict = await client.generate(           # structured output: JSON valid against the schema
            "Spam? Buy now!", response_format=ResponseFormat.json_schema({"type": "object"}))
        async for item in client.generate_stream("Hello"):
            print(item.text if isinstance(item, Token) else "", end="")

    with SyncClient() as client:             # the same API without asyncio
        print(client.generate("Hello").generated_text)

Every wire parameter (docs/protocol.md) is a typed keyword argument of `generate` / `generate_stream`
under its wire name (typed once, by `GenerateParameters`); None leaves it out, so the wire's default
applies, and a name that is no wire parameter is a TypeError. `merged_adapters` and `response_format`
take the engine's value types (`MergedAdapters`, `ResponseFormat`; no torch), and `messages` OpenAI's
chat maps (content as a string or text content parts).
`GenerationResult` and `Token` are consumer.protocol's typed replies: the values the worker sent
(`details.tokens`, `details.prefill`, `details.best_of_sequences`, `Token.alternative_tokens`).

A client that stops waiting stops the work: each job carries the caller's timeout as its deadline
(`x-deadline-ms`) unless `deadline` says otherwise, and a worker drops or cancels a job past it; a
call that ends without its final reply (a timeout, its task cancelled, a stream closed early) also
publishes a cancel message (`cancel`, consumer.cancel), which stops the job at once.
Several broker URLs (a comma-separated string or a list) make one connection that moves to another
node of the cluster when its node goes away; jobs still waiting then are published again (same job
ids: a worker answers a job it already finished from its result cache, and the client keeps the
first answer), because replies sent while the client was away are lost with its reply queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, Unpack

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from consumer import cancel
from consumer.connection import FailoverConnection, connect
from consumer.protocol import (
    HEADER_ADAPTER_ID,
    HEADER_DEADLINE,
    INTERNAL,
    JSON,
    MSGPACK,
    OVERLOADED,
    PARAMETER_NAMES,
    BestOfSequence,
    Details,
    ErrorReply,
    GenerateParameters,
    GenerationResult,
    MergedAdapters,
    ProtocolError,
    Reply,
    ResponseFormat,
    ScoredToken,
    Token,
    TokenReply,
    Topology,
    decode_reply,
    encode,
    job_body,
    merged_adapters_to_wire,
    normalize_content_type,
    response_format_to_wire,
)

# stdlib logging, not structlog: a library embedded in someone else's app logs through theirs.
log = logging.getLogger(__name__)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_TIMEOUT_S = 60.0
CANCEL_FLUSH_S = 2.0  # close() waits this long at most for cancels still being published
Message = Mapping[str, Any]  # {"role": ..., "content": a string or OpenAI's text content parts}

T = TypeVar("T")


class LoraqError(Exception):
    """Base of every error the client raises for a job."""


class UnroutableError(LoraqError):
    """The broker routed the job to no queue: no worker has declared the jobs queue (yet)."""


class GenerationTimeout(LoraqError, TimeoutError):
    """No final reply within the timeout. The job may still run; its late replies are dropped."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"job {job_id} got no reply within {timeout:g} s (is a worker running?)")
        self.job_id = job_id
        self.timeout = timeout


class GenerationError(LoraqError):
    """The worker answered with an error reply (or the broker refused the job)."""

    def __init__(self, error_type: str, message: str, retryable: bool = False,
                 job_id: str | None = None) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.job_id = job_id


class _Pending:
    """The replies of one in-flight job, in arrival order. Leaves the client's map at its final
    reply, so a duplicate final (a redelivered job answered twice) is dropped as unknown."""

    __slots__ = ("job_id", "stream", "replies", "next_index", "message")

    def __init__(self, job_id: str, stream: bool, message: aio_pika.Message) -> None:
        self.job_id = job_id
        self.stream = stream
        self.message = message  # published again after a reconnect
        self.replies: asyncio.Queue[Reply | None] = asyncio.Queue()  # None: the client closed
        self.next_index = 0  # tokens below it were seen (a recomputed job streams them again)


class Client:
    """Async client. One robust connection, one confirm channel, one exclusive reply queue;
    any number of concurrent jobs, told apart by correlation id. `url`: one broker URL, several
    comma-separated, or a list (the nodes of a cluster)."""

    def __init__(self, url: str | Sequence[str] = DEFAULT_AMQP_URL, *, topology: Topology | None = None,
                 content_type: str = MSGPACK, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self.topology = topology or Topology()
        self.content_type = normalize_content_type(content_type)
        self.timeout = timeout
        self._connection: FailoverConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._reply_queue = f"loraq.reply.{uuid.uuid4().hex}"
        self._pending: dict[str, _Pending] = {}
        self._cancels: set[asyncio.Task[bool]] = set()  # cancels of abandoned jobs being published

    async def connect(self) -> Client:
        self._connection = await connect(self.url, client_properties={
            "connection_name": f"loraq-client@{socket.gethostname()}:{os.getpid()}"})
        try:
            await self._open_channel(self._connection)
            self._connection.reconnect_callbacks.add(self._on_reconnect)
        except BaseException:
            await self.close()
            raise
        return self

    async def _open_channel(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        # on_return_raises: a mandatory job that reaches no queue raises at once instead of vanishing
        channel = self._channel = await connection.channel(publisher_confirms=True,
                                                          on_return_raises=True)
        # Declared here too (same arguments as the worker) so that publishing before any worker has
        # started is "unroutable", not a channel-closing NOT_FOUND.
        self._exchange = await channel.declare_exchange(
            self.topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        # A named queue (not amq.rabbitmq.reply-to) so the robust connection redeclares and
        # re-consumes it after a reconnect, and replies sent after that still find their job;
        # exclusive + auto_delete: gone with this client.
        queue = await channel.declare_queue(self._reply_queue, exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        for pending in self._pending.values():
            pending.replies.put_nowait(None)
        self._pending.clear()
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=CANCEL_FLUSH_S)
        self._exchange = self._channel = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def generate(
            self, inputs: str | None = None, *, messages: Sequence[Message] | None = None,
            timeout: float | None = None, job_id: str | None = None, deadline: float | None = None,
            **parameters: Unpack[GenerateParameters],
    ) -> GenerationResult:
        """Run one job and return its result. `parameters`: the wire's generation parameters by name
        (`GenerateParameters`, docs/protocol.md "Parameters"); None: the wire's default. `deadline`:
        seconds from now after which the worker drops the job, or cancels it mid-generation (default:
        `timeout`, so the work stops when the caller stops waiting). Raises UnroutableError,
        GenerationTimeout, GenerationError; before publishing, ProtocolError (bad values) or
        TypeError (a keyword that is no wire parameter)."""
        wire = _wire_parameters(parameters)
        timeout = self.timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        cid, pending = await self._submit(inputs, messages, wire, job_id,
                                          timeout if deadline is None else deadline, end, timeout,
                                          stream=False)
        try:
            return self._final(pending, await self._next(pending, end, timeout))
        finally:
            self._settle(cid, pending)

    async def generate_stream(
            self, inputs: str | None = None, *, messages: Sequence[Message] | None = None,
            timeout: float | None = None, job_id: str | None = None, deadline: float | None = None,
            **parameters: Unpack[GenerateParameters],
    ) -> AsyncGenerator[Token | GenerationResult, None]:
        """Like `generate`, streamed: yields each `Token` in order, then the `GenerationResult`.
        `timeout` bounds the whole job (and is its deadline unless `deadline` is given)."""
        wire = _wire_parameters(parameters)
        timeout = self.timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        cid, pending = await self._submit(inputs, messages, wire, job_id,
                                          timeout if deadline is None else deadline, end, timeout,
                                          stream=True)
        try:
            while True:
                reply = await self._next(pending, end, timeout)
                if isinstance(reply, TokenReply):
                    yield reply.token
                else:
                    yield self._final(pending, reply)
                    return
        finally:
            self._settle(cid, pending)

    async def cancel(self, job_id: str) -> bool:
        """Ask the workers to stop job `job_id` (docs/protocol.md, "Cancel"; best effort): the one
        holding it stops it and answers it as `deadline_exceeded`, and one that gets it later
        refuses it. A waiting `generate` of it then raises GenerationError. True when the broker
        took the cancel message (whether or not any worker held the job)."""
        if self._connection is None:
            raise LoraqError("client is not connected: use `async with Client(...)` or connect()")
        return await cancel.publish(self._connection, self.topology, job_id, self.content_type)

    def _settle(self, cid: str, pending: _Pending) -> None:
        """The end of a call: one that ends without its final reply (a timeout, a cancelled task, a
        stream closed early) cancels its job in the background."""
        if self._pending.pop(cid, None) is None or self._connection is None:
            return
        task = cancel.send(self._connection, self.topology, pending.job_id, self.content_type)
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _submit(self, inputs: str | None, messages: Sequence[Message] | None,
                      parameters: dict[str, Any], job_id: str | None,
                      deadline: float, end: float, timeout: float, *,
                      stream: bool) -> tuple[str, _Pending]:
        if self._exchange is None:
            raise LoraqError("client is not connected: use `async with Client(...)` or connect()")
        body = job_body(inputs=inputs, messages=None if messages is None else [dict(m) for m in messages],
                        parameters=parameters, stream=stream)
        adapter_id = parameters.get("adapter_id")
        job_id = job_id or str(uuid.uuid4())
        # A fresh correlation id per call: resubmitting a job id (for de-duplication) is a new wait.
        cid = uuid.uuid4().hex
        headers: dict[str, Any] = {}
        if adapter_id:  # what workers started with --affinity hash on
            headers[HEADER_ADAPTER_ID] = adapter_id
        headers[HEADER_DEADLINE] = int((time.time() + deadline) * 1000)
        message = aio_pika.Message(
            encode(body, self.content_type), content_type=self.content_type,
            message_id=job_id, correlation_id=cid, reply_to=self._reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers,
            timestamp=datetime.now(UTC))
        pending = _Pending(job_id, stream, message)
        self._pending[cid] = pending  # before publishing: a fast reply must find it
        try:
            await self._publish(message, end)
        except PublishError:
            self._pending.pop(cid, None)
            raise UnroutableError(
                f"job {job_id} is unroutable: no queue is bound to exchange "
                f"{self.topology.exchange!r} with routing key {self.topology.routing_key!r} "
                f"(start a worker: `loraq worker`)") from None
        except DeliveryError:  # Basic.Nack, e.g. a full queue with overflow=reject-publish
            self._pending.pop(cid, None)
            raise GenerationError(OVERLOADED, "the broker refused the job (nack)", True,
                                  job_id) from None
        except TimeoutError:
            self._pending.pop(cid, None)
            raise GenerationTimeout(job_id, timeout) from None
        except BaseException:
            self._pending.pop(cid, None)
            raise
        return cid, pending

    async def _publish(self, message: aio_pika.Message, end: float) -> None:
        """Publish a job and wait for its confirm. A connection or channel lost on the way is
        waited out (the robust connection restores it, on another node if need be) and the job
        published again, until `end` (TimeoutError). Publishing twice is harmless: one job id."""
        exchange, channel = self._exchange, self._channel
        assert exchange is not None and channel is not None, "connected"
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                await exchange.publish(message, self.topology.routing_key, mandatory=True, timeout=left)
                return
            except (PublishError, DeliveryError):
                raise
            except CONNECTION_EXCEPTIONS as e:
                if self._connection is None or self._connection.is_closed:
                    raise
                log.warning("publish_retry job_id=%s error=%s", message.message_id, type(e).__name__)
                await asyncio.wait_for(channel.ready(), max(0.0, end - time.monotonic()))

    def _on_reconnect(self, *_: Any) -> None:
        """The connection is back (maybe on another node) with a new reply queue: what was
        answered while it was away is lost, so publish every waiting job again."""
        for pending in list(self._pending.values()):
            asyncio.get_running_loop().create_task(self._republish(pending))

    async def _republish(self, pending: _Pending) -> None:
        try:
            assert self._exchange is not None
            await self._exchange.publish(pending.message, self.topology.routing_key, mandatory=True,
                                         timeout=self.timeout)
            log.info("job_republished job_id=%s", pending.job_id)
        except Exception as e:  # its wait times out as before; nothing else to do here
            log.warning("job_republish_failed job_id=%s error=%s", pending.job_id, type(e).__name__)

    @staticmethod
    async def _next(pending: _Pending, end: float, timeout: float) -> Reply | None:
        try:
            return await asyncio.wait_for(pending.replies.get(), max(0.0, end - time.monotonic()))
        except TimeoutError:
            raise GenerationTimeout(pending.job_id, timeout) from None

    @staticmethod
    def _final(pending: _Pending, reply: Reply | None) -> GenerationResult:
        if isinstance(reply, GenerationResult):
            return reply
        if isinstance(reply, ErrorReply):
            raise GenerationError(reply.error_type, reply.error, reply.retryable, pending.job_id)
        raise LoraqError(f"client closed while job {pending.job_id} was in flight")

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        cid = message.correlation_id or ""
        pending = self._pending.get(cid)
        if pending is None:
            log.debug("reply_dropped reason=unknown_correlation_id correlation_id=%s type=%s",
                      cid, message.type)
            return
        reply: Reply
        try:
            reply = decode_reply(message.body, message.content_type, message.type)
        except ProtocolError as e:
            # Only a worker publishes here: fail the job now rather than let it time out.
            log.warning("reply_malformed job_id=%s error=%s", pending.job_id, e)
            reply = ErrorReply(pending.job_id, INTERNAL, f"malformed {message.type} reply: {e}")
        if isinstance(reply, TokenReply):
            if not pending.stream or reply.token.index < pending.next_index:
                log.debug("reply_dropped reason=duplicate_token job_id=%s", pending.job_id)
                return
            pending.next_index = reply.token.index + 1
        else:
            self._pending.pop(cid, None)
        pending.replies.put_nowait(reply)


class SyncClient:
    """`Client` for code without an event loop: runs one in a background thread. Connects at
    construction; use it as a context manager or call `close()`."""

    def __init__(self, url: str = DEFAULT_AMQP_URL, *, topology: Topology | None = None,
                 content_type: str = MSGPACK, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loraq-client",
                                        daemon=True)
        self._thread.start()
        self._client = Client(url, topology=topology, content_type=content_type, timeout=timeout)
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(
            self, inputs: str | None = None, *, messages: Sequence[Message] | None = None,
            timeout: float | None = None, job_id: str | None = None, deadline: float | None = None,
            **parameters: Unpack[GenerateParameters],
    ) -> GenerationResult:
        """See `Client.generate`."""
        return self._call(self._client.generate(inputs, messages=messages, timeout=timeout, job_id=job_id,
                                                deadline=deadline, **parameters))

    def cancel(self, job_id: str) -> bool:
        """See `Client.cancel`."""
        return self._call(self._client.cancel(job_id))

    def generate_stream(
            self, inputs: str | None = None, *, messages: Sequence[Message] | None = None,
            timeout: float | None = None, job_id: str | None = None, deadline: float | None = None,
            **parameters: Unpack[GenerateParameters],
    ) -> Iterator[Token | GenerationResult]:
        """See `Client.generate_stream`."""
        agen = self._client.generate_stream(inputs, messages=messages, timeout=timeout, job_id=job_id,
                                            deadline=deadline, **parameters)
        try:
            while True:
                try:
                    item = self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._loop.is_closed():
                self._call(agen.aclose())  # an early `break` releases the job's slot

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wire_parameters(parameters: GenerateParameters) -> dict[str, Any]:
    """The job's `parameters` map from a call's generation keywords: those not None, the typed values
    in their wire shape. A keyword that is no wire parameter is a TypeError, as for any function."""
    given: Mapping[str, Any] = parameters
    unknown = sorted(given.keys() - set(PARAMETER_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (not a wire parameter, docs/protocol.md)")
    wire: dict[str, Any] = {}
    for name in PARAMETER_NAMES:
        value = given.get(name)
        if isinstance(value, MergedAdapters):
            value = merged_adapters_to_wire(value)
        elif isinstance(value, ResponseFormat):
            value = response_format_to_wire(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        elif name == "stop" and value is not None:
            value = [value] if isinstance(value, str) else list(value)  # a string is one stop sequence
        if value is not None:
            wire[name] = value
    return wire


__all__ = [
    "DEFAULT_AMQP_URL", "JSON", "MSGPACK", "BestOfSequence", "Client", "Details", "GenerateParameters",
    "GenerationError", "GenerationResult", "GenerationTimeout", "LoraqError", "MergedAdapters", "Message",
    "ProtocolError", "ResponseFormat", "ScoredToken", "SyncClient", "Token", "UnroutableError",
]
