"""Test-side plumbing for the gateway: a Gateway served from a thread of its own (its own event loop,
as a separate process would be, so sync clients and async tests alike call it over HTTP), and a
fake-engine worker process on a throwaway topology."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from consumer.gateway.app import Gateway
from consumer.gateway.settings import GatewaySettings
from consumer.protocol import Topology
from tests.amqp_helpers import AMQP_URL, WorkerProcess, worker_args

T = TypeVar("T")


def gateway_settings(topology: Topology, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = dict(host="127.0.0.1", port=0, amqp_url=AMQP_URL,
                                  exchange=topology.exchange, routing_key=topology.routing_key,
                                  queue=topology.queue, request_timeout_s=20.0, model="tiny-base")
    values.update(overrides)
    return GatewaySettings(**values)


class GatewayThread:
    """`Gateway(settings, tokens)` started on a new thread's loop; `url` once started."""

    def __init__(self, settings: GatewaySettings, tokens: frozenset[str] = frozenset()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.thread.start()
        self.gateway = self.call(self._build(settings, tokens))
        try:
            self.call(self.gateway.start())
        except BaseException:
            self._stop_loop()
            raise
        self.url = self.gateway.url

    @staticmethod
    async def _build(settings: GatewaySettings, tokens: frozenset[str]) -> Gateway:
        return Gateway(settings, tokens)  # built on its loop: aio-pika binds futures to it

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def inflight_jobs(self) -> int:
        return self.gateway.tracker.inflight

    def stop(self) -> None:
        try:
            self.call(self.gateway.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def start_fake_worker(topology: Topology, *extra: str, timeout: float = 20.0) -> WorkerProcess:
    """tests/worker_script.py (the fake engine) on `topology`, once it consumes."""
    worker = WorkerProcess(worker_args(topology, *extra))
    deadline = time.monotonic() + timeout
    while not worker.events("worker_started"):
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise AssertionError(f"fake worker did not start:\n{worker.output}")
        time.sleep(0.05)
    return worker
