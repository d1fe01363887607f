"""consumer.connection: one robust connection over several broker URLs, against the real broker at
LORAQ_TEST_AMQP_URL, default 127.0.0.1:5672 (reached under two names, so "another node" is observable without a cluster;
tests/system/test_failover.py stops real cluster nodes)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from aio_pika.robust_connection import RobustConnection

from consumer.connection import FailoverConnection, connect, split_urls
from consumer.logging import redact_url
from tests.amqp_helpers import AMQP_URL, wait_for

A = AMQP_URL
B = A.replace("127.0.0.1", "localhost")  # the same broker under another name
DOWN = "amqp://guest:guest@127.0.0.1:1/"


def test_the_aio_pika_hook_exists() -> None:
    """FailoverConnection overrides RobustConnection's per-attempt method, which aio-pika names
    privately: an aio-pika release that renames it must fail here, not in production."""
    assert callable(getattr(RobustConnection, "_RobustConnection__connect_transport", None))
    assert "_RobustConnection__connect_transport" in FailoverConnection.__dict__


def test_split_and_redact() -> None:
    assert split_urls(f" {A} ,{B},") == [A, B]
    assert split_urls([A, " ", B]) == [A, B]
    with pytest.raises(ValueError):
        split_urls(" , ")
    assert redact_url("amqp://guest:guest@127.0.0.1:5672/,amqp://u:p%40ss@h2/") == \
        "amqp://guest:***@127.0.0.1:5672/,amqp://u:***@h2/"


async def test_a_node_that_does_not_answer_is_skipped() -> None:
    connection = await connect([DOWN, A])
    try:
        assert connection.current_url == redact_url(A)
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()


async def test_none_answering_raises() -> None:
    with pytest.raises(ConnectionError):
        await connect(f"{DOWN},amqp://guest:guest@127.0.0.1:2/")


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_a_lost_connection_moves_to_the_next_url() -> None:
    name = "loraq-test-failover"
    connection = await connect(f"{A}?reconnect_interval=0.2,{B}",
                               client_properties={"connection_name": name})
    try:
        assert connection.current_url == redact_url(A) + "?reconnect_interval=0.2"
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, check=True).stdout
        (pid,) = [line.split("\t")[0] for line in out.splitlines() if name in line]
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test"], check=True,
                       capture_output=True)
        await asyncio.wait_for(reconnected.wait(), 20)
        assert connection.current_url == redact_url(B)
        await wait_for(lambda: connection.connected.is_set(), 5, "connected")
    finally:
        await connection.close()
