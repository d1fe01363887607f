"""The worker: RabbitMQ jobs in, engine runs, replies out (wire protocol v1, docs/protocol.md).

One delivery's life:
    decode + validate ── bad ──▶ dead-letter copy with the reason, error reply, ack
    result cache hit ──▶ the cached final reply, ack                  (redelivery: never recomputed)
    same job id in flight ──▶ joins it, answered when it finishes     (redelivery after a reconnect)
    past its deadline ──▶ deadline_exceeded (dead-lettered), ack      (the model never sees it)
    cancelled before it came ──▶ the same, "cancelled by its client"   (consumer.cancel)
    else: prefetch its adapter, collect a few ms, submit the group ──▶ engine thread
          on_token / on_finish hop back with call_soon_threadsafe ──▶ replies in order, confirmed
          then settled as consumer.settlement decides: ack, retry later (a delayed copy through
          the retry queue), return, or dead-letter with the reason
    draining (SIGTERM) ──▶ not taken: returned with nack (uncounted from RabbitMQ 4.3)

A cancel message (consumer.cancel) moves its job's deadline to now: a collected job is dropped
when its group is flushed, a job in the engine is cancelled there (its row and KV blocks freed),
and either is answered and dead-lettered as deadline_exceeded; a job not here yet is remembered
and refused on arrival (RecentCancels). A job that finished first keeps its result.

The event loop never blocks on the engine, so AMQP heartbeats and intake go on during long steps.
An ack or nack on a channel that died is skipped: the broker redelivers that job, and the result
cache (or a recompute elsewhere) answers it. The AMQP objects are declared by consumer.topology,
replies and settlements sent by consumer.publisher; the process entry points are consumer.service.
A job's api_token stays in this process: error texts are scrubbed of it before they are logged,
cached, replied or dead-lettered, and the dead-letter copy of the job is re-encoded without it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustQueue

from consumer import protocol
from consumer.cancel import RecentCancels
from consumer.collector import Collector
from consumer.connection import FailoverConnection, connect
from consumer.jobs import Delivery, InflightJob, to_request, to_result
from consumer.metrics import Metrics, MetricsServer
from consumer.protocol import ErrorReply, FinalReply, ProtocolError, Token, TokenReply
from consumer.publisher import DEAD_CHANNEL, Address, Publisher
from consumer.result_cache import ResultCache
from consumer.settings import WorkerSettings
from consumer.settlement import Action, Decision, Failure, decide
from consumer.topology import declare
from engine.lease import Lease
from engine.request import (
    AdapterRef,
    Completion,
    EngineError,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    OnFinish,
    OnToken,
    Outcome,
    TokenEvent,
)

log = structlog.get_logger(__name__)

CLOSE_TIMEOUT_S = 2.0  # closing the AMQP connection at the end of a drain
CANCELLED = "job was cancelled by its client"  # the error text of a cancelled job (deadline_exceeded)


class EngineLike(Protocol):
    """What the worker needs of `engine.Engine` (tests pass a fake)."""

    def submit_many(self, jobs: list[tuple[GenerationRequest, OnToken | None, OnFinish]]) -> None: ...
    def prefetch(self, adapter: AdapterRef) -> Lease: ...
    def cancel(self, request_id: str) -> bool: ...
    def stats(self) -> dict: ...
    def shutdown(self, timeout: float | None = None) -> None: ...


def _expiration_ms(message: AbstractIncomingMessage) -> float | None:
    expiration = message.expiration  # aio-pika decodes the AMQP ms string into float seconds
    return expiration * 1000.0 if isinstance(expiration, (int, float)) else None


def _failure(err: EngineError, secret: str | None) -> Failure:
    return Failure(err.type.value, _scrub(err.message, secret), err.retryable)


def _scrub(text: str, secret: str | None) -> str:
    """`text` with `secret` (a job's api_token) masked: an error from a hub client may quote it."""
    return text.replace(secret, "***") if secret else text


def _without_retry_deaths(headers: dict | None, retry_queue: str) -> dict | None:
    """A job back from the retry queue carries that queue's death record, whose
    `original-expiration` is the retry delay, not the job's TTL (the copy keeps its deadline as
    x-deadline-ms): drop it before the deadline is read."""
    deaths = (headers or {}).get(protocol.HEADER_DEATHS)
    if not isinstance(deaths, list):
        return headers
    queue_names = {retry_queue, retry_queue.encode()}
    kept = [d for d in deaths if not (isinstance(d, dict) and d.get("queue") in queue_names)]
    return {**(headers or {}), protocol.HEADER_DEATHS: kept}


class Worker:
    """Consume jobs from `settings`' topology and run them on `engine` until `stop()`."""

    def __init__(self, settings: WorkerSettings, engine: EngineLike, *, metrics: Metrics | None = None,
                 server: MetricsServer | None = None) -> None:
        """`metrics` and `server`: given when the metrics server was started before the engine
        was built (consumer.service); else start() serves them itself on --metrics-port."""
        self.settings = settings
        self.engine = engine
        self.topology = settings.topology
        self.limits = settings.limits
        self.metrics = metrics or Metrics()
        self.metrics.watch_engine(engine.stats)
        self.cache = ResultCache(settings.result_cache_size)
        self.metrics_port: int | None = None  # the bound port once started
        # names this worker's own queue (--affinity): unique per process and start
        self.worker_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._inflight: dict[str, InflightJob] = {}
        self._cancels = RecentCancels()  # job ids cancelled lately, whether or not they were here
        self._cancelling: set[str] = set()  # cancelled on the engine, its outcome not back yet
        self._collector: Collector[InflightJob] = Collector(
            settings.batch_window_ms / 1000.0, settings.max_batch, self._submit_group,
            idle=lambda: len(self._inflight) <= 1)  # only the job being added: nothing in the engine
        self._batch_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: FailoverConnection | None = None
        self._publisher: Publisher | None = None
        self._consumers: list[tuple[AbstractRobustQueue, str]] = []
        self._server = server
        self._owns_server = server is None
        self._stop = asyncio.Event()
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """start(), serve until stop(), then drain(): the whole life of a worker."""
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.drain()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._server is not None:
            self._server.ready = self.ready
        elif self.settings.metrics_port:
            await self.start_metrics()
        self._connection = connection = await connect(
            self.settings.amqp_url,
            client_properties={"connection_name": f"loraq-worker@{socket.gethostname()}:{os.getpid()}"})
        try:
            connection.reconnect_callbacks.add(self._on_reconnect)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            # per consumer: the shared queue and (with affinity) the own queue, each this many
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            declared = await declare(connection, channel, self.topology, affinity=self.settings.affinity,
                                     worker_id=self.worker_id)
            self._publisher = Publisher(channel, self.topology, declared.dlx, declared.results)
            routes = [(declared.jobs_queue, "shared")]
            if declared.own_queue is not None:
                routes.append((declared.own_queue, "affinity"))
            for queue, route in routes:
                self._consumers.append((queue, await queue.consume(partial(self._on_message, route))))
            await declared.cancel_queue.consume(self._on_cancel, no_ack=True)  # best effort: no acks
        except BaseException:  # no robust reconnect loop behind a failed start
            await connection.close()
            raise
        log.info("worker_started", amqp_url=connection.current_url, queue=self.topology.queue,
                 affinity_queue=declared.own_queue.name if declared.own_queue else None,
                 prefetch=self.settings.prefetch, max_batch=self.settings.max_batch,
                 batch_window_ms=self.settings.batch_window_ms, metrics_port=self.metrics_port)

    async def start_metrics(self) -> None:
        """Serve /metrics, /livez and /readyz (503 until consuming)."""
        self._server = MetricsServer(self.metrics, self.ready)
        self.metrics_port = await self._server.start(self.settings.metrics_host,
                                                     self.settings.metrics_port)

    def stop(self) -> None:
        """Ask run() to drain and return. Safe from a signal handler on the loop."""
        self._stop.set()

    def consuming(self) -> bool:
        c = self._connection
        return (bool(self._consumers) and not self._stop.is_set() and c is not None
                and not c.is_closed and c.connected.is_set())

    def engine_alive(self) -> bool:
        """The engine's step loop went round within --engine-stall-s (an engine that does not
        report `heartbeat_age_s` counts as alive)."""
        try:
            age = self.engine.stats().get("heartbeat_age_s")
        except Exception:
            return False
        return age is None or age <= self.settings.engine_stall_s

    def ready(self) -> bool:
        """Readiness (/readyz): consuming, and the engine's loop alive."""
        return self.consuming() and self.engine_alive()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop consuming; let in-flight jobs finish for `timeout` seconds (default
        --shutdown-grace-s). Jobs not finished then are cancelled on the engine and returned to
        the queue with nack (uncounted from RabbitMQ 4.3), like those collected but not submitted."""
        self._stop.set()
        timeout = self.settings.shutdown_grace_s if timeout is None else max(0.0, timeout)
        log.info("worker_stopping", inflight=len(self._inflight), wait_s=round(timeout, 3))
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            try:
                await queue.cancel(tag)
            except DEAD_CHANNEL:
                pass
        returned = []
        for inflight in self._collector.drain():  # never submitted: back to the broker
            self._inflight.pop(inflight.job.id, None)
            inflight.release_lease()
            returned.append(inflight)
        deadline = time.monotonic() + timeout
        while (self._inflight or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = list(self._inflight.values())
        self._closed = True
        for inflight in left:  # redelivered elsewhere: the engine need not finish them for nobody
            self.engine.cancel(inflight.job.id)
        for inflight in [*returned, *left]:
            for delivery in inflight.deliveries:
                if delivery.alive:
                    await self.publisher.requeue(delivery.message, delivery.job.id, Action.RETURN)
        self._inflight.clear()
        if self._server is not None and self._owns_server:
            await self._server.close()
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, *DEAD_CHANNEL):
                log.warning("amqp_close_timeout")
        self.metrics.inflight.set(0)
        log.info("worker_stopped", unfinished=len(left), returned=len(returned) + len(left))

    def _on_reconnect(self, *_: Any) -> None:
        self.metrics.reconnects.inc()
        url = self._connection.current_url if self._connection is not None else None
        log.warning("amqp_reconnected", amqp_url=url, inflight=len(self._inflight))

    # ---- intake ----------------------------------------------------------------------------------

    async def _on_message(self, route: str, message: AbstractIncomingMessage) -> None:
        """`route`: the queue it came from, "shared" or "affinity" (this worker's own)."""
        if self._closed or self._stop.is_set():  # draining: back to the broker for another worker
            if self._publisher is not None:
                await self.publisher.requeue(message, message.message_id, Action.RETURN)
            return
        try:
            await self._take(message, route)
        except Exception:  # a bug must not strand the job in our prefetch: reject counts it
            log.exception("job_handler_failed", job_id=message.message_id)  # towards the limit
            await self.publisher.requeue(message, message.message_id, Action.REJECT)

    async def _take(self, message: AbstractIncomingMessage, route: str) -> None:
        received = time.time()
        try:
            job = protocol.decode_job(
                message.body, message.content_type,
                _without_retry_deaths(message.headers, self.topology.retry_queue), message.message_id,
                message.correlation_id, message.reply_to, _expiration_ms(message), self.limits,
                timestamp=message.timestamp, received_ms=received * 1000.0)
            request = to_request(job, self.settings.engine.default_adapter_source, received)
        except ProtocolError as e:
            await self._reject(message, e)
            return
        self.metrics.jobs_received.labels(job.content_type).inc()
        self.metrics.jobs_routed.labels(route).inc()
        if message.timestamp is not None:
            self.metrics.broker_wait.observe(max(0.0, received - message.timestamp.timestamp()))
        delivery = Delivery(message, job, received)
        jlog = log.bind(job_id=job.id, adapter_id=job.adapter_id)

        cached = self.cache.get(job.id)
        if cached is not None:
            jlog.info("job_answered_from_cache", reply_type=cached.KIND, attempts=delivery.attempts)
            await self._answer(delivery, cached, outcome="cached")
            return
        inflight = self._inflight.get(job.id)
        if inflight is not None:
            jlog.info("job_joined_inflight", attempts=delivery.attempts)
            inflight.deliveries.append(delivery)
            return
        if job.id in self._cancels:
            jlog.info("job_cancelled", state="before_arrival")
            await self._fail(delivery, jlog, Failure(protocol.DEADLINE_EXCEEDED, CANCELLED))
            return
        if job.expired(received * 1000.0):
            await self._fail(delivery, jlog, Failure(protocol.DEADLINE_EXCEEDED,
                                                     "job is past its deadline"))
            return

        inflight = InflightJob(request, [delivery], jlog)
        if request.adapter is not None:  # loads while the group is being collected
            inflight.lease = self.engine.prefetch(request.adapter)
        self._inflight[job.id] = inflight
        self.metrics.inflight.set(len(self._inflight))
        jlog.debug("job_received", attempts=delivery.attempts, stream=job.stream, route=route)
        self._collector.add(inflight)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        """A cancel message (no ack: best effort): remember it, and stop the job if it is here."""
        try:
            job_id = protocol.decode_cancel(message.body, message.content_type, message.message_id,
                                            self.limits)
        except ProtocolError as e:
            log.warning("cancel_ignored", error=e.message, message_id=message.message_id)
            return
        self.cancel(job_id)

    def cancel(self, job_id: str) -> None:
        """Move job `job_id`'s deadline to now: a collected job is dropped at its group's flush, a
        job in the engine is cancelled there; either way it is answered as deadline_exceeded. An id
        not here is remembered (RecentCancels), so the job is refused if it arrives later."""
        self._cancels.add(job_id)
        inflight = self._inflight.get(job_id)
        state = "unknown" if inflight is None else "collected" if inflight.batch_id is None else "engine"
        if state == "engine" and self.engine.cancel(job_id):
            self._cancelling.add(job_id)
        log.info("job_cancel_received", job_id=job_id, state=state)

    # ---- engine hand-off -------------------------------------------------------------------------

    def _submit_group(self, group: list[InflightJob]) -> None:
        """Collector flush: hand the group to the engine (on the loop; submit returns at once)."""
        batch_id = f"b{next(self._batch_ids)}"
        now_ms = time.time() * 1000.0
        submitted: list[InflightJob] = []
        for inflight in group:
            cancelled = inflight.job.id in self._cancels
            if cancelled or inflight.job.expired(now_ms):  # cancelled or expired while collected
                self._inflight.pop(inflight.job.id, None)
                inflight.release_lease()
                self._settle_all(inflight, GenerationFailure(inflight.job.id, EngineError(
                    ErrorType.DEADLINE_EXCEEDED,
                    CANCELLED if cancelled else "job passed its deadline before it ran")))
                continue
            inflight.batch_id = batch_id
            inflight.log = inflight.log.bind(batch_id=batch_id)
            submitted.append(inflight)
        jobs = [(i.request, self._hop(partial(self._on_token, i)) if i.job.stream else None,
                 self._hop(partial(self._on_finish, i))) for i in submitted]
        try:
            if jobs:
                self.engine.submit_many(jobs)  # one group: one prefill, not a race with the step loop
        except Exception as e:  # the engine promises on_finish; a raising submit still fails
            log.exception("engine_submit_failed", batch_id=batch_id)
            for inflight in submitted:
                self._on_finish(inflight, GenerationFailure(inflight.job.id, EngineError(
                    ErrorType.INTERNAL, f"engine refused the job: {type(e).__name__}", retryable=True)))
            return
        finally:  # after submit, which holds each adapter for its request on its own
            for inflight in submitted:
                inflight.release_lease()
        if submitted:
            adapters = {i.job.adapter_id for i in submitted}
            self.metrics.batch_size.observe(len(submitted))
            self.metrics.batch_adapters.observe(len(adapters))
            log.info("batch_submitted", batch_id=batch_id, size=len(submitted),
                     adapters=len(adapters), job_ids=[i.job.id for i in submitted])

    def _hop(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        """An engine-thread callback that runs `fn` on the loop instead."""
        loop = self._loop
        assert loop is not None, "started"

        def call(arg: Any) -> None:
            try:
                loop.call_soon_threadsafe(fn, arg)
            except RuntimeError:  # the loop closed (worker gone): the broker requeues the job
                pass
        return call

    def _on_token(self, inflight: InflightJob, event: TokenEvent) -> None:
        if self._closed or inflight.job.id not in self._inflight:
            return
        reply = TokenReply(inflight.job.id, Token.of(event))
        for delivery in list(inflight.deliveries):
            if delivery.job.stream:
                self._chain(inflight, self._publish_token(delivery, reply))

    def _on_finish(self, inflight: InflightJob, outcome: Outcome) -> None:
        if self._inflight.get(inflight.job.id) is inflight:
            del self._inflight[inflight.job.id]
        self.metrics.inflight.set(len(self._inflight))
        if inflight.job.id in self._cancelling:
            self._cancelling.discard(inflight.job.id)
            if not isinstance(outcome, Completion):  # the engine's "cancelled", or a failure racing it
                outcome = GenerationFailure(inflight.job.id, EngineError(ErrorType.DEADLINE_EXCEEDED, CANCELLED))
        if self._closed:
            return
        try:
            if isinstance(outcome, Completion):
                self._observe(inflight, outcome)
            self._settle_all(inflight, outcome)
        except Exception:  # e.g. an outcome we cannot encode: requeue it, counted towards the limit
            inflight.log.exception("job_settle_failed")
            for delivery in inflight.deliveries:
                self._spawn(self.publisher.requeue(delivery.message, delivery.job.id, Action.REJECT))

    def _observe(self, inflight: InflightJob, r: Completion) -> None:
        t = r.timings
        m = self.metrics
        m.queue_wait.observe(t.queue_ms / 1000.0)
        m.ttft.observe(t.ttft_ms / 1000.0)
        m.generated_tokens.inc(r.generated_tokens)
        decode_s = (t.total_ms - t.ttft_ms) / 1000.0
        if r.generated_tokens > 1 and decode_s > 0:
            m.tokens_per_second.observe((r.generated_tokens - 1) / decode_s)
        inflight.log.info("job_finished", finish_reason=r.finish_reason,
                          prompt_tokens=r.prompt_tokens, generated_tokens=r.generated_tokens,
                          queue_ms=round(t.queue_ms, 2), ttft_ms=round(t.ttft_ms, 2),
                          total_ms=round(t.total_ms, 2), adapter_load_ms=round(t.adapter_load_ms, 2))

    def _settle_all(self, inflight: InflightJob, outcome: Outcome) -> None:
        """Answer every delivery of the job, in publication order after its tokens."""
        if isinstance(outcome, Completion):
            result = to_result(inflight.job, outcome)
            self.cache.put(inflight.job.id, result)
            for delivery in inflight.deliveries:
                self._chain(inflight, self._answer(delivery, result))
            return
        failure = _failure(outcome.error, inflight.job.parameters.api_token)
        if not failure.retryable:  # deterministic: remember it, a redelivery gets the same answer
            self.cache.put(inflight.job.id, ErrorReply(inflight.job.id, failure.error_type, failure.message))
        for delivery in inflight.deliveries:
            self._chain(inflight, self._fail(delivery, inflight.log, failure))

    def _chain(self, inflight: InflightJob, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` after everything chained before it for this job (token order, then final)."""
        prev = inflight.tail

        async def link() -> None:
            if prev is not None:
                await prev
            await coro

        inflight.tail = self._spawn(link())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- replies and settlement (consumer.settlement decides, consumer.publisher sends) ---------

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "started"
        return self._publisher

    async def _publish_token(self, delivery: Delivery, reply: TokenReply) -> None:
        if delivery.alive:
            await self.publisher.reply(delivery.address, reply)

    async def _answer(self, delivery: Delivery, reply: FinalReply, outcome: str | None = None) -> None:
        """Final reply, confirmed, then ack. A failed publish on a live channel requeues."""
        if not delivery.alive:
            self.metrics.jobs_finished.labels("lost").inc()
            log.warning("delivery_channel_closed", job_id=delivery.job.id)
            return
        if await self.publisher.reply(delivery.address, reply):
            await self.publisher.ack(delivery.message, delivery.job.id)
            self.metrics.job_latency.observe(time.time() - delivery.received)
            self.metrics.jobs_finished.labels(outcome or reply.KIND).inc()
        else:
            self.metrics.jobs_finished.labels("returned").inc()
            await self.publisher.requeue(delivery.message, delivery.job.id, Action.RETURN)

    async def _fail(self, delivery: Delivery, jlog: Any, failure: Failure) -> None:
        """Settle a failed job as `decide` says. A dead delivery is left alone: its redelivery is
        answered from the cache (or recomputed, for retryable failures)."""
        if not delivery.alive:
            self.metrics.jobs_finished.labels("lost").inc()
            jlog.warning("delivery_channel_closed", error_type=failure.error_type)
            return
        attempts = delivery.attempts
        decision = decide(failure, attempts, self.topology.delivery_limit, self.settings.backoff)
        if decision.action is Action.RETRY:
            await self._retry(delivery, jlog, decision)
            return
        if decision.action is Action.RETURN:
            jlog.warning("job_returned", error_type=failure.error_type, error=failure.message,
                         attempts=attempts)
            self.metrics.jobs_finished.labels("returned").inc()
            await self.publisher.requeue(delivery.message, delivery.job.id, Action.RETURN)
            return
        assert decision.failure is not None
        jlog.warning("job_failed", error_type=failure.error_type, error=decision.failure.message,
                     attempts=attempts)
        await self._dead_letter(delivery.message, delivery.job.id, delivery.address,
                                decision.failure)

    async def _retry(self, delivery: Delivery, jlog: Any, decision: Decision) -> None:
        """A delayed copy through the retry queue, then ack. If the copy is not confirmed the
        delivery is rejected instead: requeued at once, and counted on every broker version."""
        assert decision.failure is not None
        jlog.warning("job_retried", error_type=decision.failure.error_type,
                     error=decision.failure.message, retry=decision.retry,
                     delay_s=round(decision.delay_s, 3))
        self.metrics.jobs_finished.labels("retried").inc()
        if await self.publisher.retry(delivery.message, delivery.job, decision):
            await self.publisher.ack(delivery.message, delivery.job.id)
        else:
            await self.publisher.requeue(delivery.message, delivery.job.id, Action.REJECT)

    async def _reject(self, message: AbstractIncomingMessage, e: ProtocolError) -> None:
        """A job that cannot be decoded or validated: dead-letter it with the reason, reply, ack."""
        job_id = message.message_id or message.correlation_id
        log.warning("job_rejected", job_id=job_id, error_type=e.error_type, error=e.message,
                    content_type=message.content_type)
        try:
            ct = protocol.normalize_content_type(message.content_type)
        except ProtocolError:
            ct = protocol.JSON  # readable by anyone
        to = Address(message.reply_to, message.correlation_id, ct) if message.reply_to else None
        await self._dead_letter(message, job_id, to, Failure(e.error_type, e.message))

    async def _dead_letter(self, message: AbstractIncomingMessage, job_id: str | None,
                           to: Address | None, failure: Failure) -> None:
        """Dead-letter copy, then the error reply (to `to`; None: nobody to tell), then ack. A
        step that fails leaves the job unacked: the broker redelivers it."""
        self.metrics.errors.labels(failure.error_type).inc()
        if not await self.publisher.dead_letter(message, failure):
            return
        reply = ErrorReply(job_id, failure.error_type, failure.message, retryable=False)
        if to is not None and not await self.publisher.reply(to, reply):
            return
        await self.publisher.ack(message, job_id)
        self.metrics.jobs_finished.labels("dead_lettered").inc()
