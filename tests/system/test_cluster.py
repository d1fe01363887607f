"""The 3-node cluster fixture (tests/cluster.py) does what the cluster tests rely on: a quorum queue is
replicated on every node, and persistent messages confirmed through one node survive the loss of the
queue's leader and are consumed, all of them, in order, through another node."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest

from tests.cluster import ClusterError, RabbitCluster

pytestmark = pytest.mark.cluster

MESSAGES = 200
ELECTION_TIMEOUT_S = 60.0


async def wait_for_leader(cluster: RabbitCluster, queue: str, not_on: str) -> str:
    """The queue's leader once it is on a node other than `not_on` (a new one is elected). While
    the election runs, a node may not list the queue at all: that is "not yet" too."""
    deadline = time.monotonic() + ELECTION_TIMEOUT_S
    while True:
        try:
            leader = await asyncio.to_thread(cluster.leader_of, queue)
        except ClusterError:
            leader = not_on
        if leader != not_on:
            return leader
        assert time.monotonic() < deadline, f"{queue}: no leader other than {not_on} after {ELECTION_TIMEOUT_S} s"
        await asyncio.sleep(0.5)


async def consume(url: str, queue: str, count: int, timeout_s: float = 60.0) -> list[bytes]:
    """Bodies of `count` messages consumed (and acked) from `queue` through the node at `url`."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        q = await channel.get_queue(queue, ensure=False)
        bodies: list[bytes] = []
        async with q.iterator() as messages:
            async with asyncio.timeout(timeout_s):
                async for message in messages:
                    bodies.append(message.body)
                    await message.ack()
                    if len(bodies) == count:
                        break
        return bodies
    finally:
        await connection.close()


async def test_quorum_queue_survives_its_leader_stopping(rabbit_cluster: RabbitCluster):
    cluster = rabbit_cluster
    print(f"\ncluster of {cluster.names} started in {cluster.boot_s:.1f} s")
    node_a = cluster.names[0]
    queue = f"test.cluster.{uuid.uuid4().hex[:10]}"
    sent = [f"message {i}".encode() for i in range(MESSAGES)]

    # publish through node A, each message persistent and confirmed (aio-pika channels confirm by default)
    connection = await aio_pika.connect(cluster.node(node_a).url)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    for body in sent:
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue)
    await connection.close()
    assert await asyncio.to_thread(cluster.members_of, queue) == sorted(cluster.names)

    leader = await asyncio.to_thread(cluster.leader_of, queue)
    assert leader in cluster.names
    await asyncio.to_thread(cluster.stop, leader)
    stopped = time.monotonic()
    try:
        new_leader = await wait_for_leader(cluster, queue, not_on=leader)
        assert new_leader in cluster.names
        print(f"leader {leader} stopped; {new_leader} leads {time.monotonic() - stopped:.1f} s later")
        # consume through a running node other than A where possible (A may have been the leader)
        reader = next(n for n in reversed(cluster.names) if n not in (leader, node_a))
        received = await consume(cluster.node(reader).url, queue, MESSAGES)
        assert received == sent  # none lost, none twice, in publish order
    finally:
        await asyncio.to_thread(cluster.start, leader)

    # the stopped node is back: still a member, and the (now empty) queue is served from every node
    assert await asyncio.to_thread(cluster.members_of, queue) == sorted(cluster.names)
    connection = await aio_pika.connect(cluster.node(leader).url)
    channel = await connection.channel()
    q = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    assert q.declaration_result.message_count == 0
    await q.delete(if_unused=False, if_empty=False)
    await connection.close()
