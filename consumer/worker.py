"""The worker: RabbitMQ jobs in, engine runs, replies out (wire protocol v1, shared/design/protocol.md).

One delivery's life:
    decode + validate ── bad ──▶ dead-letter copy with the reason, error reply, ack
    result cache hit ──▶ the cached final reply, ack                  (redelivery: never recomputed)
    same job id in flight ──▶ joins it, answered when it finishes     (redelivery after a reconnect)
    past its deadline ──▶ deadline_exceeded (dead-lettered), ack      (the model never sees it)
    else: prefetch its adapter, collect a few ms, submit the group ──▶ engine thread
          on_token / on_finish hop back with call_soon_threadsafe ──▶ replies in order, confirmed
          result: ack after the final reply is confirmed
          retryable failure: nack(requeue) until the delivery limit, then dead-letter with reason
          other failure: dead-letter with reason, error reply, ack

The event loop never blocks on the engine, so AMQP heartbeats and intake go on during long steps.
An ack or nack on a channel that died is skipped: the broker redelivers that job, and the result
cache (or a recompute elsewhere) answers it.

Adapter affinity (`--affinity`, off by default; every worker of a topology on or every one off):

    jobs exchange ──generate──▶ affinity exchange (x-consistent-hash on header x-adapter-id)
                                   │ one of the workers' own queues, chosen by the adapter id
                                   ├──▶ worker queue (classic, durable, x-message-ttl 0, x-expires)
                                   │       └─ not taken at once ─dead-letter─┐
                                   └─ no worker queue bound ─alternate-exchange─┤
                                                               affinity fallback (fanout)
                                                                   ▼
                                                         jobs queue (quorum, shared)

Each worker consumes its own queue and the shared jobs queue. The shared queue loses its direct
binding (it is reached through the fallback instead; a queue reached twice gets one copy), so a job
is in exactly one queue at a time. A job hashed to a worker reaches it only if that worker can
take it this instant: a queue TTL of 0 expires every message that cannot be delivered to a
consumer at once, and expired messages are dead-lettered to the fallback, i.e. the shared queue
(RabbitMQ's documented "TTL 0" behaviour). So the worker queue never holds ready messages, and:
  - a busy or dead worker: its jobs spill to the shared queue at once, any worker takes them;
  - a worker killed with unacked jobs: they are requeued with their original expiry (already
    past), so they are dead-lettered to the shared queue too, not left in its queue;
  - x-expires then deletes the dead worker's queue and its binding: nothing is in it to lose
    (deleting a queue does not dead-letter; that is why messages must never wait in it);
  - a broker restart: the queue is durable, so persistent jobs held unacked by its worker come
    back; the TTL, re-applied as the queue starts, dead-letters them to the shared queue;
  - no affinity worker at all: the affinity exchange routes to no queue, so its alternate
    exchange (the fallback) takes the job to the shared queue.
Dead-lettering drops a job's `expiration`; protocol.parse_deadline restores it from `x-death`.
A publisher that leaves out x-adapter-id still works: its jobs hash as one key (no affinity).
Limits: classic-queue dead-lettering is at-most-once (a broker crash in that instant can lose the
job); running affinity and non-affinity workers on one topology binds the shared queue both ways
and may run a job twice (answered twice; clients drop the duplicate).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, DeliveryMode

from consumer import protocol
from consumer.collector import Collector
from consumer.logging import configure_logging
from consumer.metrics import Metrics, MetricsServer, probe
from consumer.protocol import Job, ProtocolError
from consumer.result_cache import CachedOutcome, ResultCache
from consumer.settings import WorkerSettings
from engine.request import (AdapterRef, EngineError, ErrorType, GenerationFailure,
                            GenerationRequest, Completion, Outcome, SamplingParams,
                            TokenEvent)

log = structlog.get_logger(__name__)

# a channel or connection that died under us: the delivery is gone, the broker redelivers it
DEAD_CHANNEL = (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError,
                ConnectionError, asyncio.TimeoutError)
PUBLISH_TIMEOUT_S = 30.0
AFFINITY_EXCHANGE_TYPE = "x-consistent-hash"  # from the plugin rabbitmq_consistent_hash_exchange
AFFINITY_WEIGHT = "1"  # consistent-hash binding key: buckets per worker (all workers alike)
AFFINITY_QUEUE_EXPIRES_MS = 10_000  # a dead worker's (always empty) queue leaves the ring after this


class AffinityUnavailable(RuntimeError):
    """--affinity on a broker without the consistent-hash exchange plugin."""


class EngineLike(Protocol):
    """What the worker needs of `engine.Engine` (tests pass a fake)."""

    def submit_many(self, jobs: list[tuple[GenerationRequest, Callable[[TokenEvent], None] | None,
                                           Callable[[Outcome], None]]]) -> None: ...
    def prefetch(self, adapter: AdapterRef) -> None: ...
    def release_prefetch(self, adapter: AdapterRef) -> None: ...
    def cancel(self, request_id: str) -> bool: ...
    def stats(self) -> dict: ...
    def shutdown(self, timeout: float | None = None) -> None: ...


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
            return int(raw)
        except (TypeError, ValueError):
            return 0

    @property
    def alive(self) -> bool:
        try:
            return not self.message.channel.is_closed
        except aiormq.exceptions.ChannelInvalidStateError:
            return False


@dataclass(eq=False)
class InflightJob:
    """A job collected or running on the engine, with every delivery waiting for its outcome."""

    request: GenerationRequest
    deliveries: list[Delivery]
    log: Any
    batch_id: str | None = None
    tail: asyncio.Task | None = field(default=None, repr=False)  # replies publish in this order

    @property
    def job(self) -> Job:
        return self.deliveries[0].job


def to_request(job: Job, default_source: str, arrival: float) -> GenerationRequest:
    """Job -> engine request. Raises ProtocolError if the engine's own checks disagree."""
    p = job.parameters
    try:
        params = SamplingParams(
            max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty, stop=p.stop, seed=p.seed, logprobs=p.details)
    except ValueError as e:
        raise ProtocolError(protocol.VALIDATION, f"parameters: {e}") from None
    adapter = None if p.adapter_id is None else AdapterRef(
        id=p.adapter_id, source=p.adapter_source or default_source, api_token=p.api_token)
    return GenerationRequest(
        id=job.id, params=params, prompt=job.inputs,
        messages=None if job.messages is None else [dict(m) for m in job.messages],
        adapter=adapter,
        deadline=None if job.deadline_ms is None else job.deadline_ms / 1000.0,
        arrival_time=arrival)


def to_result_body(job: Job, result: Completion) -> dict:
    text = job.inputs + result.text if job.parameters.return_full_text else result.text
    tokens = None
    if job.parameters.details:
        tokens = [protocol.token_dict(t.token_id, t.text, t.logprob) for t in result.tokens]
    t = result.timings
    return protocol.result_body(
        job.id, text, finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
        generated_tokens=result.generated_tokens, seed=result.seed, adapter_id=job.adapter_id,
        timings={"queue_ms": t.queue_ms, "adapter_load_ms": t.adapter_load_ms,
                 "ttft_ms": t.ttft_ms, "total_ms": t.total_ms},
        tokens=tokens)


def _expiration_ms(message: AbstractIncomingMessage) -> float | None:
    # aio-pika decodes the AMQP ms string into seconds
    return None if message.expiration is None else message.expiration * 1000.0


class Worker:
    """Consume jobs from `settings`' topology and run them on `engine` until `stop()`."""

    def __init__(self, settings: WorkerSettings, engine: EngineLike) -> None:
        self.settings = settings
        self.engine = engine
        self.topology = settings.topology()
        self.limits = settings.limits()
        self.metrics = Metrics()
        self.metrics.watch_engine(engine.stats)
        self.cache = ResultCache(settings.result_cache_size)
        self.metrics_port: int | None = None  # the bound port once started
        # names this worker's own queue (--affinity): unique per process and start
        self.worker_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._inflight: dict[str, InflightJob] = {}
        self._collector: Collector[InflightJob] = Collector(
            settings.batch_window_ms / 1000.0, settings.max_batch, self._submit_group,
            idle=lambda: len(self._inflight) <= 1)  # only the job being added: nothing in the engine
        self._batch_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None
        self._own_queue: aio_pika.abc.AbstractRobustQueue | None = None  # --affinity only
        self._results: aio_pika.abc.AbstractExchange | None = None
        self._dlx: aio_pika.abc.AbstractExchange | None = None
        self._consumers: list[tuple[aio_pika.abc.AbstractRobustQueue, str]] = []
        self._server: MetricsServer | None = None
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
        if self.settings.metrics_port and self._server is None:
            await self.start_metrics()
        self._connection = await aio_pika.connect_robust(
            self.settings.amqp_url,
            client_properties={"connection_name": f"loraq-worker@{socket.gethostname()}:{os.getpid()}"})
        try:
            self._connection.reconnect_callbacks.add(self._on_reconnect)
            self._channel = await self._connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
            # per consumer: the shared queue and (with affinity) the own queue, each this many
            await self._channel.set_qos(prefetch_count=self.settings.prefetch)
            await self._declare()
            self._consumers.append(
                (self._queue, await self._queue.consume(partial(self._on_message, "shared"))))
            if self._own_queue is not None:
                self._consumers.append((self._own_queue, await self._own_queue.consume(
                    partial(self._on_message, "affinity"))))
        except BaseException:  # no robust reconnect loop behind a failed start
            await self._connection.close()
            raise
        log.info("worker_started", amqp_url=self.settings.redacted_url(), queue=self.topology.queue,
                 affinity_queue=self._own_queue.name if self._own_queue else None,
                 prefetch=self.settings.prefetch, max_batch=self.settings.max_batch,
                 batch_window_ms=self.settings.batch_window_ms, metrics_port=self.metrics_port)

    async def start_metrics(self) -> None:
        """Serve /metrics and /healthz (503 until consuming; nothing answers while the engine
        loads, which a healthcheck reads as not ready either)."""
        self._server = MetricsServer(self.metrics, self.healthy)
        self.metrics_port = await self._server.start(self.settings.metrics_host,
                                                     self.settings.metrics_port)

    def stop(self) -> None:
        """Ask run() to drain and return. Safe from a signal handler on the loop."""
        self._stop.set()

    def healthy(self) -> bool:
        c = self._connection
        return (bool(self._consumers) and not self._stop.is_set() and c is not None
                and not c.is_closed and c.connected.is_set())

    async def drain(self) -> None:
        """Stop consuming; let in-flight jobs finish within the grace period; jobs not finished
        stay unacked and go back to the queue when the connection closes."""
        self._stop.set()
        log.info("worker_stopping", inflight=len(self._inflight),
                 grace_s=self.settings.shutdown_grace_s)
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            try:
                await queue.cancel(tag)
            except DEAD_CHANNEL:
                pass
        for inflight in self._collector.drain():  # never submitted: leave them to the broker
            self._inflight.pop(inflight.job.id, None)
            self._release_prefetch(inflight)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while (self._inflight or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = len(self._inflight)
        self._closed = True
        if self._server is not None:
            await self._server.close()
        if self._connection is not None:
            await self._connection.close()
        self.metrics.inflight.set(0)
        log.info("worker_stopped", unfinished=left)

    async def _declare(self) -> None:
        t, ch = self.topology, self._channel
        self._dlx = await ch.declare_exchange(t.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await ch.declare_queue(t.dead_queue, durable=True)
        await dead.bind(self._dlx, routing_key="")
        jobs = await ch.declare_exchange(t.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        self._queue = await ch.declare_queue(t.queue, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": t.delivery_limit,
            "x-dead-letter-exchange": t.dlx,
        })
        if self.settings.affinity:
            await self._declare_affinity(jobs)
        else:
            await self._queue.bind(jobs, routing_key=t.routing_key)
        self._results = await ch.declare_exchange(t.results_exchange, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)

    async def _declare_affinity(self, jobs: aio_pika.abc.AbstractExchange) -> None:
        """The affinity topology of the module docstring. Order matters while other workers run:
        the jobs reach the shared queue through the fallback before its direct binding goes, and
        this worker's queue joins the ring last (never two routes to two queues)."""
        t, ch = self.topology, self._channel
        fallback = await ch.declare_exchange(t.affinity_fallback, aio_pika.ExchangeType.FANOUT,
                                             durable=True)
        await self._queue.bind(fallback, routing_key="")
        try:
            ring = await ch.declare_exchange(
                t.affinity_exchange, AFFINITY_EXCHANGE_TYPE, durable=True,
                arguments={"hash-header": protocol.HEADER_ADAPTER_ID,
                           "alternate-exchange": t.affinity_fallback})
        except aiormq.exceptions.ConnectionCommandInvalid as e:  # unknown exchange type
            raise AffinityUnavailable(
                "--affinity needs the RabbitMQ plugin rabbitmq_consistent_hash_exchange "
                "(rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)") from e
        await ring.bind(jobs, routing_key=t.routing_key)
        await self._queue.unbind(jobs, routing_key=t.routing_key)
        self._own_queue = await ch.declare_queue(
            t.worker_queue(self.worker_id), durable=True,
            arguments={"x-message-ttl": 0,  # taken at once, else dead-lettered to the shared queue
                       "x-dead-letter-exchange": t.affinity_fallback,
                       "x-expires": AFFINITY_QUEUE_EXPIRES_MS})
        await self._own_queue.bind(ring, routing_key=AFFINITY_WEIGHT)

    def _on_reconnect(self, *_: Any) -> None:
        self.metrics.reconnects.inc()
        log.warning("amqp_reconnected", inflight=len(self._inflight))

    # ---- intake ----------------------------------------------------------------------------------

    async def _on_message(self, route: str, message: AbstractIncomingMessage) -> None:
        """`route`: the queue it came from, "shared" or "affinity" (this worker's own)."""
        if self._closed or self._stop.is_set():
            return  # draining: leave it unacked, the broker gives it to another worker
        try:
            await self._take(message, route)
        except Exception:  # a bug must not strand the job in our prefetch: the delivery limit
            log.exception("job_handler_failed", job_id=message.message_id)  # bounds the retries
            await self._nack(message, message.message_id, requeue=True)

    async def _take(self, message: AbstractIncomingMessage, route: str) -> None:
        received = time.time()
        try:
            job = protocol.decode_job(
                message.body, message.content_type, message.headers, message.message_id,
                message.correlation_id, message.reply_to, _expiration_ms(message), self.limits,
                timestamp=message.timestamp, received_ms=received * 1000.0)
            request = to_request(job, self.settings.default_adapter_source, received)
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
            jlog.info("job_answered_from_cache", reply_type=cached.reply_type,
                      delivery_count=delivery.count)
            await self._finish(delivery, cached.reply_type, cached.body, outcome="cached")
            return
        inflight = self._inflight.get(job.id)
        if inflight is not None:
            jlog.info("job_joined_inflight", delivery_count=delivery.count)
            inflight.deliveries.append(delivery)
            return
        if job.expired(received * 1000.0):
            await self._fail(delivery, jlog, EngineError(ErrorType.DEADLINE_EXCEEDED,
                                                         "job is past its deadline"))
            return

        inflight = InflightJob(request, [delivery], jlog)
        self._inflight[job.id] = inflight
        self.metrics.inflight.set(len(self._inflight))
        if request.adapter is not None:
            self.engine.prefetch(request.adapter)  # loads while the group is being collected
        jlog.debug("job_received", delivery_count=delivery.count, stream=job.stream,
                   route=route)
        self._collector.add(inflight)

    def _release_prefetch(self, inflight: InflightJob) -> None:
        """Pair the prefetch made on arrival, once the job is submitted (the engine then holds the
        adapter itself) or dropped unsubmitted (else its adapter stays held against eviction)."""
        if inflight.request.adapter is not None:
            self.engine.release_prefetch(inflight.request.adapter)

    def _submit_group(self, group: list[InflightJob]) -> None:
        """Collector flush: hand the group to the engine (on the loop; submit returns at once)."""
        batch_id = f"b{next(self._batch_ids)}"
        now_ms = time.time() * 1000.0
        submitted: list[InflightJob] = []
        for inflight in group:
            if inflight.job.expired(now_ms):  # expired while collected
                self._inflight.pop(inflight.job.id, None)
                self._release_prefetch(inflight)
                self._settle_all(inflight, GenerationFailure(inflight.job.id, EngineError(
                    ErrorType.DEADLINE_EXCEEDED, "job passed its deadline before it ran")))
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
                self._release_prefetch(inflight)
        if submitted:
            adapters = {i.job.adapter_id for i in submitted}
            self.metrics.batch_size.observe(len(submitted))
            self.metrics.batch_adapters.observe(len(adapters))
            log.info("batch_submitted", batch_id=batch_id, size=len(submitted),
                     adapters=len(adapters), job_ids=[i.job.id for i in submitted])

    def _hop(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        """An engine-thread callback that runs `fn` on the loop instead."""
        loop = self._loop

        def call(arg: Any) -> None:
            try:
                loop.call_soon_threadsafe(fn, arg)
            except RuntimeError:  # the loop closed (worker gone): the broker requeues the job
                pass
        return call

    # ---- engine callbacks (on the loop) ----------------------------------------------------------

    def _on_token(self, inflight: InflightJob, event: TokenEvent) -> None:
        if self._closed or inflight.job.id not in self._inflight:
            return
        body = protocol.token_body(inflight.job.id, event.index, event.token_id, event.text,
                                   event.logprob)
        for delivery in list(inflight.deliveries):
            if delivery.job.stream:
                self._chain(inflight, self._publish_token(delivery, body))

    def _on_finish(self, inflight: InflightJob, outcome: Outcome) -> None:
        if self._inflight.get(inflight.job.id) is inflight:
            del self._inflight[inflight.job.id]
        self.metrics.inflight.set(len(self._inflight))
        if self._closed:
            return
        try:
            if isinstance(outcome, Completion):
                self._observe(inflight, outcome)
            self._settle_all(inflight, outcome)
        except Exception:  # e.g. an outcome we cannot encode: retry it (bounded by the limit)
            inflight.log.exception("job_settle_failed")
            for delivery in inflight.deliveries:
                self._spawn(self._nack(delivery.message, delivery.job.id, requeue=True))

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
            body = to_result_body(inflight.job, outcome)
            self.cache.put(inflight.job.id, CachedOutcome(protocol.REPLY_RESULT, body, False))
            for delivery in inflight.deliveries:
                self._chain(inflight, self._finish(delivery, protocol.REPLY_RESULT, body))
            return
        err = outcome.error
        if not err.retryable:  # deterministic: remember it, a redelivery gets the same answer
            self.cache.put(inflight.job.id, CachedOutcome(
                protocol.REPLY_ERROR, protocol.error_body(inflight.job.id, err.type.value,
                                                          err.message), True))
        for delivery in inflight.deliveries:
            self._chain(inflight, self._fail(delivery, inflight.log, err))

    def _chain(self, inflight: InflightJob, coro) -> None:
        """Run `coro` after everything chained before it for this job (token order, then final)."""
        prev = inflight.tail

        async def link() -> None:
            if prev is not None:
                await prev
            await coro

        inflight.tail = self._spawn(link())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- replies and settlement ------------------------------------------------------------------

    async def _finish(self, delivery: Delivery, reply_type: str, body: dict,
                      outcome: str | None = None) -> None:
        """Final reply, confirmed, then ack. A failed publish on a live channel requeues."""
        if not delivery.alive:
            self.metrics.jobs_finished.labels("lost").inc()
            log.warning("delivery_channel_closed", job_id=delivery.job.id)
            return
        if await self._reply(delivery.message, delivery.job, reply_type, body):
            await self._ack(delivery.message, delivery.job.id)
            self.metrics.job_latency.observe(time.time() - delivery.received)
            self.metrics.jobs_finished.labels(outcome or reply_type).inc()
        else:
            await self._nack(delivery.message, delivery.job.id, requeue=True)

    async def _fail(self, delivery: Delivery, jlog: Any, err: EngineError) -> None:
        """Retryable: requeue while deliveries remain, else (and for every other error) dead-letter
        with the reason, reply with the error, ack. A dead delivery is left alone: its redelivery
        is answered from the cache (or recomputed, for retryable failures)."""
        if not delivery.alive:
            self.metrics.jobs_finished.labels("lost").inc()
            jlog.warning("delivery_channel_closed", error_type=err.type.value)
            return
        count = delivery.count
        if err.retryable and count < self.topology.delivery_limit:
            jlog.warning("job_requeued", error_type=err.type.value, error=err.message,
                         delivery_count=count)
            self.metrics.jobs_finished.labels("requeued").inc()
            await self._nack(delivery.message, delivery.job.id, requeue=True)
            return
        if err.retryable:
            message = f"{err.message} (gave up after {count + 1} deliveries)"
        else:
            message = err.message
        jlog.warning("job_failed", error_type=err.type.value, error=message, delivery_count=count)
        body = protocol.error_body(delivery.job.id, err.type.value, message, retryable=False)
        self.metrics.errors.labels(err.type.value).inc()
        if await self._dead_letter(delivery.message, err.type.value, message) and \
                await self._reply(delivery.message, delivery.job, protocol.REPLY_ERROR, body):
            await self._ack(delivery.message, delivery.job.id)
            self.metrics.jobs_finished.labels("dead_lettered").inc()

    async def _reject(self, message: AbstractIncomingMessage, e: ProtocolError) -> None:
        """A job that cannot be decoded or validated: dead-letter it with the reason, reply, ack."""
        job_id = message.message_id or message.correlation_id
        log.warning("job_rejected", job_id=job_id, error_type=e.error_type, error=e.message,
                    content_type=message.content_type)
        self.metrics.errors.labels(e.error_type).inc()
        try:
            ct = protocol.normalize_content_type(message.content_type)
        except ProtocolError:
            ct = protocol.JSON  # readable by anyone
        body = protocol.error_body(job_id, e.error_type, e.message)
        if not await self._dead_letter(message, e.error_type, e.message):
            return
        if message.reply_to and not await self._publish(
                message.reply_to, None, message.correlation_id, ct, protocol.REPLY_ERROR, body):
            return
        await self._ack(message, job_id)
        self.metrics.jobs_finished.labels("dead_lettered").inc()

    async def _reply(self, message: AbstractIncomingMessage, job: Job, reply_type: str,
                     body: dict) -> bool:
        return await self._publish(job.reply_to, job.adapter_id, job.correlation_id,
                                   job.content_type, reply_type, body)

    async def _publish_token(self, delivery: Delivery, body: dict) -> None:
        if delivery.alive:
            await self._publish(delivery.job.reply_to, delivery.job.adapter_id,
                                delivery.job.correlation_id, delivery.job.content_type,
                                protocol.REPLY_TOKEN, body)

    async def _publish(self, reply_to: str | None, adapter_id: str | None,
                       correlation_id: str | None, content_type: str, reply_type: str,
                       body: dict) -> bool:
        """Publish one reply and wait for the broker's confirm. To reply_to (mandatory: an
        unroutable reply is logged and counted as answered: its client is gone), else to the
        results exchange. False when it could not be published (the job must not be acked)."""
        message = aio_pika.Message(
            protocol.encode(body, content_type), content_type=content_type,
            correlation_id=correlation_id, type=reply_type,
            delivery_mode=DeliveryMode.NOT_PERSISTENT if reply_to else DeliveryMode.PERSISTENT)
        try:
            if reply_to:
                await self._channel.default_exchange.publish(
                    message, routing_key=reply_to, mandatory=True, timeout=PUBLISH_TIMEOUT_S)
            else:
                await self._results.publish(
                    message, routing_key=self.topology.result_routing_key(adapter_id),
                    mandatory=False, timeout=PUBLISH_TIMEOUT_S)
            return True
        except aiormq.exceptions.PublishError:
            log.warning("reply_unroutable", job_id=body.get("id"), reply_to=reply_to,
                        reply_type=reply_type)
            return True
        except DEAD_CHANNEL as e:
            log.warning("reply_publish_failed", job_id=body.get("id"), reply_type=reply_type,
                        error=type(e).__name__)
            return False

    async def _dead_letter(self, message: AbstractIncomingMessage, error_type: str,
                           reason: str) -> bool:
        """A copy of the job on the dead-letter exchange, with the reason in its headers."""
        reason_headers = {protocol.HEADER_ERROR_CODE: error_type, protocol.HEADER_ERROR: reason[:1000]}

        def copy(headers: dict) -> aio_pika.Message:
            return aio_pika.Message(
                message.body, headers=headers, content_type=message.content_type,
                content_encoding=message.content_encoding, message_id=message.message_id,
                correlation_id=message.correlation_id, reply_to=message.reply_to,
                timestamp=message.timestamp, type=message.type, app_id=message.app_id,
                delivery_mode=DeliveryMode.PERSISTENT)

        try:
            try:
                await self._dlx.publish(copy({**(message.headers or {}), **reason_headers}),
                                        routing_key=message.routing_key or "", mandatory=False,
                                        timeout=PUBLISH_TIMEOUT_S)
            except (TypeError, ValueError):  # hostile headers that do not encode back: drop them
                await self._dlx.publish(copy(reason_headers), routing_key=message.routing_key or "",
                                        mandatory=False, timeout=PUBLISH_TIMEOUT_S)
        except DEAD_CHANNEL as e:
            log.warning("dead_letter_failed", job_id=message.message_id, error=type(e).__name__)
            return False
        return True

    async def _ack(self, message: AbstractIncomingMessage, job_id: str | None) -> None:
        try:
            await message.ack()
        except DEAD_CHANNEL as e:  # includes MessageProcessError: never ack twice
            log.warning("ack_failed", job_id=job_id, error=type(e).__name__)

    async def _nack(self, message: AbstractIncomingMessage, job_id: str | None,
                    requeue: bool) -> None:
        try:
            await message.nack(requeue=requeue)
        except DEAD_CHANNEL as e:
            log.warning("nack_failed", job_id=job_id, error=type(e).__name__)


# ---- process entry points ------------------------------------------------------------------------

def build_engine(settings: WorkerSettings) -> EngineLike:
    """The real engine (imports torch; takes a while: the model loads here)."""
    from engine.engine import Engine

    return Engine(settings.engine_config())


async def run_worker(settings: WorkerSettings, engine: EngineLike | None = None) -> None:
    """Run a worker until SIGTERM / SIGINT, then drain and return. Builds the engine when none is
    given (and shuts down only an engine it built)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    owned = engine is None
    worker: Worker | None = None
    try:
        if owned:
            log.info("engine_loading", model=settings.model, device=settings.device,
                     dtype=settings.dtype)
            engine = await asyncio.to_thread(build_engine, settings)
        if stop.is_set():
            return
        candidate = Worker(settings, engine)
        await candidate.start()  # raises if the broker is unreachable or the topology conflicts
        worker = candidate
        await stop.wait()
    finally:
        if worker is not None:
            await worker.drain()
        if owned and engine is not None:
            await asyncio.to_thread(engine.shutdown, 5.0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """`loraq worker` / `python -m consumer`."""
    try:
        settings = WorkerSettings.from_args(argv)
    except ValueError as e:
        print(f"loraq worker: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(run_worker(settings))
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as e:  # broker unreachable
        log.error("worker_failed", error=f"{type(e).__name__}: {e}")
        return 1
    except Exception:  # e.g. the model or the engine config failed to load
        log.exception("worker_failed")
        return 1
    return 0


def health_main(argv: list[str] | None = None) -> int:
    """`loraq health` / `python -m consumer health`: exit 0 when the local worker is healthy."""
    import argparse

    parser = argparse.ArgumentParser(prog="loraq health",
                                     description="exit 0 if the worker's /healthz answers 200")
    parser.add_argument("--port", type=int, default=None,
                        help="metrics port (default LORAQ_METRICS_PORT or 9090)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else WorkerSettings.from_args([]).metrics_port
    ok = probe(port, args.host)
    print("healthy" if ok else "unhealthy", file=sys.stderr)
    return 0 if ok else 1
