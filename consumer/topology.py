"""Declares a worker's AMQP objects (wire protocol v1 topology, docs/protocol.md).

Without affinity: jobs exchange (direct) ──generate──▶ jobs queue (quorum, x-delivery-limit,
dead-letters to the DLX) ; DLX (fanout) ──▶ dead-letter queue ; results exchange (topic).

A broker cluster: what a worker declares on its robust channel is declared again on whichever node
it reconnects to, so all of it is replicated or node-independent (exchanges, quorum queues). The
dead-letter queue is created as a quorum queue too, but declared once at start on a channel of its
own: a dead-letter queue made by an older loraq is classic, lives on one node, and cannot be
redeclared while that node is down (nor turned into a quorum queue: PRECONDITION_FAILED), so it is
used as it is. Bound it with a broker policy (README), never with arguments here.

Cancels (consumer.cancel): cancel exchange (fanout, durable) ──▶ one queue per worker (exclusive,
auto-delete: gone with the worker's connection, declared again on the node it reconnects to), which
the worker consumes without acks. Every worker sees every cancel; the one holding the job stops it.

Retries (consumer.settlement): retry queue (quorum, no consumer) ── a copy expires after its own
per-message TTL (the backoff) ── dead-lettered, at least once, to the jobs exchange with the jobs
routing key ──▶ the jobs queue (or, with affinity, the worker that holds its adapter). RabbitMQ
expires messages at the head of a queue only, so a copy waits at least its own delay and at most
the longest delay queued ahead of it.

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

from dataclasses import dataclass

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection, AbstractRobustQueue
from aio_pika.exceptions import ChannelNotFoundEntity

from consumer.protocol import HEADER_ADAPTER_ID, Topology

AFFINITY_EXCHANGE_TYPE = "x-consistent-hash"  # from the plugin rabbitmq_consistent_hash_exchange
AFFINITY_WEIGHT = "1"  # consistent-hash binding key: buckets per worker (all workers alike)
AFFINITY_QUEUE_EXPIRES_MS = 10_000  # a dead worker's (always empty) queue leaves the ring after this


class AffinityUnavailable(RuntimeError):
    """--affinity on a broker without the consistent-hash exchange plugin."""


@dataclass(frozen=True)
class Declared:
    """What a worker consumes from and publishes to."""

    jobs_queue: AbstractRobustQueue  # the shared quorum queue
    own_queue: AbstractRobustQueue | None  # this worker's affinity queue (--affinity only)
    cancel_queue: AbstractRobustQueue  # this worker's cancel messages
    dlx: AbstractExchange
    results: AbstractExchange


async def declare(connection: AbstractRobustConnection, channel: AbstractRobustChannel,
                  topology: Topology, *, affinity: bool, worker_id: str) -> Declared:
    """Declare (idempotently) every object of `topology` on `channel` (the dead-letter queue on a
    channel of its own), and this worker's cancel queue; with `affinity`, also its own jobs queue.
    Both are named after `worker_id`.
    Raises AffinityUnavailable without the broker plugin."""
    t = topology
    dlx = await channel.declare_exchange(t.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
    await _declare_dead_queue(connection, t)
    jobs = await channel.declare_exchange(t.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    queue = await channel.declare_queue(t.queue, durable=True, arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": t.delivery_limit,
        "x-dead-letter-exchange": t.dlx,
    })
    await channel.declare_queue(t.retry_queue, durable=True, arguments={
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": t.exchange,
        "x-dead-letter-routing-key": t.routing_key,
        "x-dead-letter-strategy": "at-least-once",  # a broker crash mid-hop loses no retry
        "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
    })
    own = None
    if affinity:
        own = await _declare_affinity(channel, t, jobs, queue, worker_id)
    else:
        await queue.bind(jobs, routing_key=t.routing_key)
    results = await channel.declare_exchange(t.results_exchange, aio_pika.ExchangeType.TOPIC,
                                             durable=True)
    cancels = await channel.declare_exchange(t.cancel_exchange, aio_pika.ExchangeType.FANOUT,
                                             durable=True)
    cancel_queue = await channel.declare_queue(t.cancel_queue(worker_id), exclusive=True,
                                               auto_delete=True)
    await cancel_queue.bind(cancels, routing_key="")
    return Declared(jobs_queue=queue, own_queue=own, dlx=dlx, results=results,
                    cancel_queue=cancel_queue)


async def _declare_dead_queue(connection: AbstractRobustConnection, t: Topology) -> None:
    """The dead-letter queue, bound to the DLX: an existing one as it is, else a new quorum queue.
    Its channel is closed after, so a reconnect never redeclares it (see the module docstring)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            dead = await channel.declare_queue(t.dead_queue, passive=True)
        except ChannelNotFoundEntity:  # closes the channel: create it on a new one
            await channel.close()
            channel = await connection.channel(publisher_confirms=False)
            dead = await channel.declare_queue(t.dead_queue, durable=True,
                                               arguments={"x-queue-type": "quorum"})
        await dead.bind(t.dlx, routing_key="")
    finally:
        if not channel.is_closed:
            await channel.close()


async def _declare_affinity(channel: AbstractRobustChannel, t: Topology, jobs: AbstractExchange,
                            queue: AbstractRobustQueue, worker_id: str) -> AbstractRobustQueue:
    """Order matters while other workers run: the jobs reach the shared queue through the fallback
    before its direct binding goes, and this worker's queue joins the ring last (never two routes
    to two queues)."""
    fallback = await channel.declare_exchange(t.affinity_fallback, aio_pika.ExchangeType.FANOUT,
                                              durable=True)
    await queue.bind(fallback, routing_key="")
    try:
        ring = await channel.declare_exchange(
            t.affinity_exchange, AFFINITY_EXCHANGE_TYPE, durable=True,
            arguments={"hash-header": HEADER_ADAPTER_ID, "alternate-exchange": t.affinity_fallback})
    except (aiormq.exceptions.ConnectionCommandInvalid,  # unknown exchange type: 3.x closes the connection,
            aiormq.exceptions.ChannelPreconditionFailed) as e:  # 4.x the channel
        if isinstance(e, aiormq.exceptions.ChannelPreconditionFailed) and "unknown exchange type" not in str(e):
            raise  # the ring exists with other arguments: not a missing plugin
        raise AffinityUnavailable(
            "--affinity needs the RabbitMQ plugin rabbitmq_consistent_hash_exchange "
            "(rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)") from e
    await ring.bind(jobs, routing_key=t.routing_key)
    await queue.unbind(jobs, routing_key=t.routing_key)
    own = await channel.declare_queue(
        t.worker_queue(worker_id), durable=True,
        arguments={"x-message-ttl": 0,  # taken at once, else dead-lettered to the shared queue
                   "x-dead-letter-exchange": t.affinity_fallback,
                   "x-expires": AFFINITY_QUEUE_EXPIRES_MS})
    await own.bind(ring, routing_key=AFFINITY_WEIGHT)
    return own
