"""Test-side AMQP plumbing shared by the worker and fault tests: a backend app written with plain
aio-pika (independent of consumer.client), unique topologies, and topology clean-up."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from consumer import protocol
from consumer.protocol import MSGPACK, Topology
from consumer.settings import WorkerSettings

AMQP_URL = os.environ.get("LORAQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def with_query(url: str, **options) -> str:
    """`url` plus AMQP query options, e.g. reconnect_interval=0.5."""
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return url + ("&" if "?" in url else "?") + query


async def affinity_available() -> bool:
    """Whether the broker has the consistent-hash exchange plugin (needed by --affinity)."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        name = f"test.probe.{uuid.uuid4().hex[:10]}"
        await channel.declare_exchange(name, "x-consistent-hash", auto_delete=True)
        await channel.exchange_delete(name)
        return True
    except aiormq.exceptions.ConnectionCommandInvalid:  # unknown exchange type
        return False
    finally:
        await connection.close()


async def require_affinity() -> None:
    """Skip the calling test when the broker lacks the consistent-hash exchange plugin."""
    if not await affinity_available():
        pytest.skip("broker lacks rabbitmq_consistent_hash_exchange (rabbitmq-plugins enable it)")


def unique_topology(**overrides) -> Topology:
    return Topology.prefixed(f"test.{uuid.uuid4().hex[:10]}", **overrides)


def worker_settings(topology: Topology, **flags) -> WorkerSettings:
    """A worker on `topology` with test defaults (small batches, no metrics port); `flags` as
    WorkerSettings.from_flags takes them."""
    values = dict(amqp_url=AMQP_URL, max_batch=8, prefetch=16, batch_window_ms=5.0, metrics_port=0,
                  shutdown_grace_s=5.0)
    values.update(flags)
    return dataclasses.replace(WorkerSettings.from_flags(**values), topology=topology)


async def wait_for(predicate, timeout: float, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class WorkerProcess:
    """tests/worker_script.py (a worker on the fake engine) as a child process, output collected;
    `real=True`: `python -m consumer` (`loraq worker`, the real engine) instead."""

    def __init__(self, args: list[str], real: bool = False) -> None:
        root = Path(__file__).resolve().parents[1]
        entry = ["-m", "consumer"] if real else [str(root / "tests" / "worker_script.py")]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *args],
            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def events(self, name: str) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    async def started(self, timeout: float = 20.0) -> None:
        await wait_for(lambda: self.events("worker_started") or self.proc.poll() is not None,
                       timeout, "worker process start")
        assert self.proc.poll() is None, self.output

    async def wait(self, timeout: float = 20.0) -> int:
        rc = await asyncio.to_thread(self.proc.wait, timeout)
        self._reader.join(2)
        return rc

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(2)


def worker_args(topology: Topology, *extra: str) -> list[str]:
    """tests/worker_script.py flags for a worker on `topology`, then `extra`."""
    settings = WorkerSettings(amqp_url=AMQP_URL, topology=topology, metrics_port=0)
    return [*settings.to_args(), *extra]


class App:
    """A backend app: publishes jobs, collects every reply by correlation id."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.replies: dict[str, list[AbstractIncomingMessage]] = defaultdict(list)
        self.reply_queue = f"test.reply.{uuid.uuid4().hex}"
        self.name = f"loraq-test-app:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # its connection's name

    async def open(self, robust: bool = False) -> App:
        """robust: reconnect after a broker restart, redeclaring and re-consuming the reply queue
        (replies published while it was gone are lost: the app republishes such jobs)."""
        properties = {"connection_name": self.name}
        if robust:
            self.connection = await aio_pika.connect_robust(
                with_query(AMQP_URL, reconnect_interval=0.5), client_properties=properties)
        else:
            self.connection = await aio_pika.connect(AMQP_URL, client_properties=properties)
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await self.channel.declare_queue(self.reply_queue, exclusive=True,
                                                 auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def close(self) -> None:
        await self.connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.replies[message.correlation_id].append(message)

    async def publish_raw(self, body: bytes, content_type: str | None = MSGPACK, *,
                          correlation_id: str | None = None, message_id: str | None = None,
                          reply_to: str | None | bool = True, headers: dict | None = None,
                          expiration: float | None = None, timestamp=None) -> str:
        """Publish a job as bytes. reply_to=True: our reply queue; False/None: none."""
        correlation_id = correlation_id or uuid.uuid4().hex
        message = aio_pika.Message(
            body, content_type=content_type, correlation_id=correlation_id,
            message_id=message_id if message_id is not None else correlation_id,
            reply_to=self.reply_queue if reply_to is True else (reply_to or None),
            headers=headers or {}, expiration=expiration, timestamp=timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        exchange = await self.channel.get_exchange(self.topology.exchange, ensure=False)
        await exchange.publish(message, routing_key=self.topology.routing_key, mandatory=True)
        return correlation_id

    async def publish(self, content_type: str = MSGPACK, *, inputs: str | None = None,
                      messages: list | None = None, stream: bool = False, **kw) -> str:
        """A valid job; like consumer.client, it names its adapter in x-adapter-id (affinity)."""
        parameters = kw.pop("parameters", None)
        body = protocol.encode_job(inputs=inputs, messages=messages, parameters=parameters,
                                   stream=stream, content_type=content_type)
        if adapter_id := (parameters or {}).get("adapter_id"):
            kw["headers"] = {protocol.HEADER_ADAPTER_ID: adapter_id, **(kw.get("headers") or {})}
        return await self.publish_raw(body, content_type, **kw)

    async def wait(self, correlation_id: str, timeout: float = 10.0, final: bool = True):
        """Every reply of the job once its final one (result / error) arrived."""
        def done():
            got = self.replies.get(correlation_id, [])
            return got if any(m.type != protocol.REPLY_TOKEN for m in got) or not final and got \
                else None
        return await wait_for(done, timeout, f"reply to {correlation_id}")

    def final(self, correlation_id: str) -> tuple[str, dict]:
        """(type, body) of the single final reply (asserts there is exactly one)."""
        finals = [m for m in self.replies[correlation_id] if m.type != protocol.REPLY_TOKEN]
        assert len(finals) == 1, f"{len(finals)} final replies for {correlation_id}"
        m = finals[0]
        return m.type, protocol.decode(m.body, m.content_type)

    async def dead(self, count: int, timeout: float = 10.0) -> list[AbstractIncomingMessage]:
        """Wait for `count` messages in the dead-letter queue and take them."""
        queue = await self.channel.get_queue(self.topology.dead_queue, ensure=False)
        got: list[AbstractIncomingMessage] = []

        async def poll():
            while len(got) < count:
                m = await queue.get(no_ack=True, fail=False)
                if m is None:
                    await asyncio.sleep(0.05)
                else:
                    got.append(m)

        await asyncio.wait_for(poll(), timeout)
        return got

    async def queue_depth(self, name: str) -> int | None:
        """Ready messages in `name`; None if it does not exist (a throwaway channel takes the 404)."""
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            return queue.declaration_result.message_count
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()


async def delete_topology(topology: Topology) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for name in (topology.queue, topology.dead_queue, topology.retry_queue):
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)  # quorum queues refuse if_unused / if_empty
            except aio_pika.exceptions.AMQPError:
                pass
        for name in (topology.exchange, topology.dlx, topology.results_exchange,
                     topology.affinity_exchange, topology.affinity_fallback, topology.cancel_exchange):
            channel = await connection.channel()
            try:
                await channel.exchange_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass
    finally:
        await connection.close()


def broker_connection_of(pid: int, role: str) -> str:
    """The broker's (Erlang) id of process `pid`'s AMQP connection; `role` is "worker" or "client"
    (their connection names are loraq-<role>@host:pid)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        erlang_pid, _, props = line.partition("\t")
        if f"loraq-{role}@" in props and f':{pid}"' in props:
            return erlang_pid
    raise AssertionError(f"no {role} connection of pid {pid}")
