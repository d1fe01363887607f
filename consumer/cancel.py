"""Cancel messages (docs/protocol.md, "Cancel"): a publisher that stops waiting for a job tells
every worker, and the one holding the job stops it.

    Client / gateway ──{"v": 1, "id": job id}──▶ cancel exchange (fanout, `<exchange>.cancel`)
                                                    ├──▶ worker A's own queue (exclusive, auto-delete)
                                                    └──▶ worker B's own queue ...

The publisher side is `publish` (awaited) and `send` (in the background, for a caller that cannot
wait: a `finally` block, a cancelled task); the worker side remembers recent cancels in
`RecentCancels`, so a cancel that overtakes its job (still queued, or being retried) refuses it on
arrival. Cancels are best effort: a worker that starts after a cancel was sent never sees it, and
the job's deadline still bounds the work. No structlog here: the client imports this module.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import AMQPError

from consumer.protocol import MSGPACK, Topology, encode_cancel, normalize_content_type

PUBLISH_TIMEOUT_S = 5.0
REMEMBER_S = 600.0  # how long a worker refuses a job whose cancel came before it
REMEMBER_MAX = 10_000  # cancels a worker remembers at most (the oldest are forgotten first)

_sending: set[asyncio.Task] = set()  # background publishes, referenced until done (else collectable)


async def publish(connection: AbstractConnection, topology: Topology, job_id: str,
                  content_type: str = MSGPACK, timeout: float = PUBLISH_TIMEOUT_S) -> bool:
    """Publish a cancel of `job_id` to `topology.cancel_exchange` and wait for the broker's confirm.
    A channel of its own (declaring the exchange, as workers do), so a broker error here never
    closes the caller's job channel. False when it could not be sent (no connection, a broker
    error, `timeout` passed); True also when no worker is bound to take it."""
    ct = normalize_content_type(content_type)
    message = aio_pika.Message(encode_cancel(job_id, ct), content_type=ct, message_id=job_id,
                               type="cancel", timestamp=datetime.now(UTC),
                               delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)

    async def send_once() -> None:
        async with connection.channel(publisher_confirms=True) as channel:
            exchange = await channel.declare_exchange(topology.cancel_exchange,
                                                      aio_pika.ExchangeType.FANOUT, durable=True)
            await exchange.publish(message, routing_key="", mandatory=False)

    if connection.is_closed:
        return False
    try:
        await asyncio.wait_for(send_once(), timeout)
    except (AMQPError, ConnectionError, RuntimeError, TimeoutError):
        return False
    return True


def send(connection: AbstractConnection, topology: Topology, job_id: str,
         content_type: str = MSGPACK) -> asyncio.Task[bool]:
    """`publish` in the background, on the running loop; the task (awaiting it is optional)."""
    task = asyncio.get_running_loop().create_task(publish(connection, topology, job_id, content_type))
    _sending.add(task)
    task.add_done_callback(_sending.discard)
    return task


class RecentCancels:
    """The job ids cancelled in the last `remember_s` seconds, at most `max_size` of them (the
    oldest forgotten first). Lives on the worker's event loop; no locks."""

    def __init__(self, remember_s: float = REMEMBER_S, max_size: int = REMEMBER_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if remember_s <= 0 or max_size < 1:
            raise ValueError("remember_s must be > 0 and max_size >= 1")
        self.remember_s = remember_s
        self.max_size = max_size
        self._clock = clock
        self._at: OrderedDict[str, float] = OrderedDict()  # job id -> when cancelled, oldest first

    def add(self, job_id: str) -> None:
        self._at.pop(job_id, None)
        self._at[job_id] = self._clock()
        self._expire()
        while len(self._at) > self.max_size:
            self._at.popitem(last=False)

    def __contains__(self, job_id: object) -> bool:
        self._expire()
        return job_id in self._at

    def __len__(self) -> int:
        self._expire()
        return len(self._at)

    def _expire(self) -> None:
        oldest = self._clock() - self.remember_s
        while self._at and next(iter(self._at.values())) < oldest:
            self._at.popitem(last=False)
