"""The gateway as a service: bearer auth, metrics, no worker (503), deadlines, a client that goes
away, and its broker connection dropped mid-request. Real broker, fake-engine worker processes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import aio_pika
import aiohttp
import openai
import pytest
import requests
from lorax import Client
from lorax.errors import UnknownError

from tests.amqp_helpers import AMQP_URL, delete_topology, unique_topology, wait_for, with_query
from tests.fake_engine import expected_text
from tests.gateway.harness import GatewayThread, gateway_settings, start_fake_worker

pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")  # lorax-client


@pytest.fixture(scope="module")
def slow_topology():
    t = unique_topology()
    yield t
    asyncio.run(delete_topology(t))


@pytest.fixture(scope="module")
def slow_gateway(slow_topology):
    """A worker whose every step takes 50 ms (a 40-token job: ~2 s), and a gateway that
    reconnects to the broker within half a second."""
    worker = start_fake_worker(slow_topology, "--fake-step-s", "0.05")
    g = GatewayThread(gateway_settings(slow_topology,
                                       amqp_url=with_query(AMQP_URL, reconnect_interval=0.5)))
    yield g
    g.stop()
    worker.kill()


def test_bearer_tokens(fake_topology, fake_worker):
    g = GatewayThread(gateway_settings(fake_topology), tokens=frozenset({"s3cret", "other"}))
    try:
        with pytest.raises(UnknownError, match="401"):
            Client(g.url).generate("x", max_new_tokens=2)
        r = Client(g.url, headers={"Authorization": "Bearer s3cret"}).generate("x", max_new_tokens=2)
        assert r.generated_text == "<b"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{g.url}/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=f"{g.url}/v1", api_key="other", max_retries=0).models.list()
        assert models.data[0].id == "tiny-base"
        for path in ("/health", "/healthz", "/metrics"):  # probes need no token
            assert requests.get(g.url + path, timeout=5).status_code == 200
        resp = requests.get(f"{g.url}/info", timeout=5)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    finally:
        g.stop()


def test_metrics_count_requests_by_route_and_status(gateway):
    requests.post(f"{gateway.url}/generate", json={"inputs": "m", "parameters": {"max_new_tokens": 1}},
                  timeout=10)
    requests.post(f"{gateway.url}/generate", json={"inputs": ""}, timeout=10)
    text = requests.get(f"{gateway.url}/metrics", timeout=5).text
    assert 'loraq_gateway_requests_total{method="POST",route="/generate",status="200"}' in text
    assert 'loraq_gateway_requests_total{method="POST",route="/generate",status="422"}' in text
    assert 'loraq_gateway_request_seconds_count{route="/generate"}' in text
    assert "loraq_gateway_inflight_jobs 0.0" in text


def test_no_queue_is_503_at_once():
    t = unique_topology()  # no worker ever declared its queue
    g = GatewayThread(gateway_settings(t))
    try:
        with pytest.raises(UnknownError, match="503"):
            Client(g.url).generate("x")
        with pytest.raises(openai.InternalServerError) as e:
            openai.OpenAI(base_url=f"{g.url}/v1", api_key="-", max_retries=0).completions.create(
                model="tiny-base", prompt="x")
        assert e.value.status_code == 503 and e.value.body["code"] == "unavailable"
        assert requests.get(f"{g.url}/health", timeout=5).status_code == 503
    finally:
        g.stop()
        asyncio.run(delete_topology(t))


async def test_queue_without_worker_is_503_at_the_deadline():
    t = unique_topology()
    connection = await aio_pika.connect(AMQP_URL)
    try:  # the jobs queue as a worker declares it, with no consumer
        channel = await connection.channel()
        exchange = await channel.declare_exchange(t.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue(t.queue, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, t.routing_key)
        g = await asyncio.to_thread(GatewayThread, gateway_settings(t, request_timeout_s=0.5))
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{g.url}/generate", json={"inputs": "x"}) as resp:
                    assert resp.status == 503
                    body = await resp.json()
            assert body["error_type"] == "unavailable" and "no worker is consuming" in body["error"]
        finally:
            await asyncio.to_thread(g.stop)
    finally:
        await connection.close()
        await delete_topology(t)


async def test_client_that_disconnects_releases_its_job(slow_gateway):
    g = slow_gateway
    body = {"inputs": "gone", "parameters": {"max_new_tokens": 40}}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):  # waiting for the whole answer
            async with session.post(f"{g.url}/generate", json=body,
                                    timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
        async with session.post(f"{g.url}/generate_stream", json=body) as resp:
            await resp.content.readline()  # mid-stream
            assert g.inflight_jobs() >= 1
            resp.close()
    await wait_for(lambda: g.inflight_jobs() == 0, 5, "the gateway to forget both jobs")
    metrics = requests.get(f"{g.url}/metrics", timeout=5).text
    assert "loraq_gateway_client_disconnects_total 2.0" in metrics
    assert 'route="/generate",status="499"' in metrics


def _gateway_connection(name: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        erlang_pid, _, props = line.partition("\t")
        if name in props:
            return erlang_pid
    raise AssertionError(f"no AMQP connection named {name}")


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_broker_connection_dropped_mid_request(slow_gateway):
    """The reply queue goes with the connection; the gateway reconnects, publishes the job again
    under its id, and the worker answers it (its result cache, or the run it joins)."""
    g = slow_gateway
    erlang_pid = await asyncio.to_thread(_gateway_connection, g.gateway.tracker.name)
    prompt = "survive " * 25  # the fake writes it backwards: 120 tokens of 50 ms
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 120}}
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.post(f"{g.url}/generate", json=body))
        await wait_for(lambda: g.inflight_jobs() == 1, 5, "the job in flight")
        started = time.monotonic()
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "close_connection",
                                                 erlang_pid, "gateway test"], check=True,
                                capture_output=True)
        resp = await request
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["generated_text"] == expected_text(prompt, None, 120)
        assert time.monotonic() - started < 20
    await wait_for(lambda: "loraq_gateway_reconnects_total 1.0" in requests.get(
        f"{g.url}/metrics", timeout=5).text, 5, "the reconnect counted")
