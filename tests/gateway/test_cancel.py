"""An HTTP client that disconnects cancels its job: the gateway publishes a cancel message (consumer
.cancel) and the fake-engine worker behind it stops the job in its engine; a request answered in
full cancels nothing."""

from __future__ import annotations

import asyncio

import aio_pika
import aiohttp
import pytest
import requests

from consumer import protocol
from consumer.protocol import Limits
from consumer.worker import CANCELLED
from tests.amqp_helpers import AMQP_URL, wait_for


@pytest.fixture
async def cancels(fake_topology):
    """A queue of our own bound to the cancel exchange: every cancel the gateway publishes."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(fake_topology.cancel_exchange, aio_pika.ExchangeType.FANOUT,
                                              durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange)
    yield queue
    await channel.exchange_delete(fake_topology.cancel_exchange)
    await connection.close()


async def test_client_that_disconnects_cancels_its_job(gateway, fake_worker, cancels):
    answered = requests.post(f"{gateway.url}/generate", timeout=20,
                             json={"inputs": "whole", "parameters": {"max_new_tokens": 5}})
    assert answered.status_code == 200
    # the "slow" adapter's first step takes 1.5 s on the fake worker: the client leaves before it
    body = {"inputs": "gone", "parameters": {"adapter_id": "slow", "max_new_tokens": 40}}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(f"{gateway.url}/generate", json=body,
                                    timeout=aiohttp.ClientTimeout(total=0.5)):
                pass
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def one_cancel() -> bool:
        m = await cancels.get(no_ack=True, fail=False)
        if m is not None:
            got.append(m)
        return bool(got)

    deadline = asyncio.get_running_loop().time() + 5
    while not await one_cancel():
        assert asyncio.get_running_loop().time() < deadline, "no cancel published"
        await asyncio.sleep(0.05)
    job_id = protocol.decode_cancel(got[0].body, got[0].content_type, got[0].message_id, Limits())

    def stopped() -> bool:
        return any(e.get("job_id") == job_id and e.get("error") == CANCELLED
                   for e in fake_worker.events("job_failed"))

    await wait_for(stopped, 10, "the worker to answer the job as cancelled")
    received = [e for e in fake_worker.events("job_cancel_received") if e["job_id"] == job_id]
    assert [e["state"] for e in received] == ["engine"]  # stopped in the engine, not run to the end
    assert gateway.inflight_jobs() == 0
    assert await cancels.get(no_ack=True, fail=False) is None  # the answered request sent none
