"""Gateway fixtures: one fake-engine worker and one gateway per test module, on a throwaway
topology (the fake engine's output is known in advance: tests/fake_engine.expected_text), and a
gateway whose jobs queue refuses every job (the broker's overload answer)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import pytest

from tests.amqp_helpers import AMQP_URL, delete_topology, unique_topology
from tests.gateway.harness import GatewayThread, gateway_settings, start_fake_worker

# `flaky` fails retryably on every run: the worker retries it once (delivery limit 1) after
# 50 ms, then answers the failure
FAKE_FLAGS = ("--fake-step-s", "0.002",
              "--fake-fail", "missing=adapter_not_found",
              "--fake-fail", "flaky=internal:retryable", "--retry-delay-s", "0.05",
              "--fake-slow", "slow=1.5")
ADAPTERS = ("acme/support", "acme/sales", "pirate")  # listed by /v1/models


@pytest.fixture(scope="module")
def fake_topology():
    t = unique_topology(delivery_limit=1)
    yield t
    asyncio.run(delete_topology(t))


@pytest.fixture(scope="module")
def fake_worker(fake_topology):
    worker = start_fake_worker(fake_topology, *FAKE_FLAGS)
    yield worker
    worker.kill()


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name in ADAPTERS:
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (root / "not-an-adapter").mkdir()
    return root


@pytest.fixture(scope="module")
def gateway(fake_topology, fake_worker, adapter_root):
    """A gateway on the fake worker's topology, listing `adapter_root`."""
    g = GatewayThread(gateway_settings(fake_topology, adapter_root=str(adapter_root)))
    yield g
    g.stop()


async def _declare_full_queue(topology) -> None:
    """The jobs exchange and a jobs queue that holds nothing and refuses what it cannot hold: every
    publish is nacked, as a full queue with overflow reject-publish nacks it."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.DIRECT,
                                                  durable=True)
        queue = await channel.declare_queue(topology.queue, durable=True, arguments={
            "x-max-length": 0, "x-overflow": "reject-publish"})
        await queue.bind(exchange, topology.routing_key)


@pytest.fixture(scope="module")
def full_gateway():
    """A gateway whose jobs queue refuses every job."""
    t = unique_topology()
    asyncio.run(_declare_full_queue(t))
    g = GatewayThread(gateway_settings(t))
    yield g
    g.stop()
    asyncio.run(delete_topology(t))
