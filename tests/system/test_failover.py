"""A worker and a client on a 3-node RabbitMQ cluster (tests/cluster.py) while nodes go away.

Mid-run, the node holding the jobs queue's leader is stopped (a new leader is elected; whoever was
connected to it reconnects to another node), started again, and then the node the worker is
connected to at that moment is stopped too. Judged from the client's side: every job answered
exactly once as the client sees it (Client.generate returns once per job), none lost, no error
replies, nothing dead-lettered. One node at a time is down, so the quorum queues keep a majority.
The phases' times and the number of jobs are printed (the README's fault table quotes them).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika
import pytest

from consumer.client import Client, GenerationResult
from tests.amqp_helpers import WorkerProcess, unique_topology, wait_for, with_query, worker_args
from tests.cluster import RabbitCluster
from tests.fake_engine import expected_text

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

JOBS = 90
RECOVERY_S = 90.0  # bound on waits for a reconnect or for progress (a hang check, not a measure)


def node_of(cluster: RabbitCluster, redacted_url: str) -> str:
    """The node a redacted `amqp://user:***@127.0.0.1:<port>/...` URL points at."""
    (node,) = [n.name for n in cluster.nodes if f":{n.port}/" in redacted_url]
    return node


def worker_node(cluster: RabbitCluster, worker: WorkerProcess) -> str:
    """The node the worker is connected to now (its last start or reconnect event)."""
    events = worker.events("worker_started") + worker.events("amqp_reconnected")
    latest = max(events, key=lambda e: e["timestamp"])
    return node_of(cluster, latest["amqp_url"])


async def test_jobs_survive_the_leader_node_and_the_workers_node_stopping(rabbit_cluster: RabbitCluster, caplog):
    caplog.set_level(logging.INFO, logger="consumer.client")
    cluster = rabbit_cluster
    began = time.monotonic()
    topology = unique_topology(delivery_limit=5)
    urls = cluster.urls
    fast = [with_query(urls[0], reconnect_interval=0.5), *urls[1:]]
    worker = WorkerProcess(worker_args(topology, "--amqp-url", ",".join(fast), "--fake-step-s", "0.02",
                                       "--max-batch", "8", "--prefetch", "16"))
    client = Client([with_query(urls[1], reconnect_interval=0.5), urls[2], urls[0]],
                    topology=topology, timeout=240.0)
    results: dict[str, GenerationResult] = {}
    errors: dict[str, BaseException] = {}
    timeline: list[str] = []

    def mark(what: str) -> None:
        timeline.append(f"{time.monotonic() - began:6.1f} s  {what} ({len(results)}/{JOBS} answered)")

    async def job(i: int) -> None:
        prompt = f"failover job {i:03d}"
        try:
            results[prompt] = await client.generate(prompt, job_id=f"{topology.queue}.{i}")
        except Exception as e:  # any error reply or timeout fails the test below
            errors[prompt] = e

    async def publish_all() -> None:
        for i in range(JOBS):
            tasks.append(asyncio.create_task(job(i)))
            await asyncio.sleep(0.25)

    tasks: list[asyncio.Task] = []
    try:
        await worker.started(timeout=60)
        await client.connect()
        mark(f"worker on {worker_node(cluster, worker)}, client on {node_of(cluster, client._connection.current_url)}")
        publishing = asyncio.create_task(publish_all())

        await wait_for(lambda: len(results) >= 10, RECOVERY_S, "jobs flowing")
        leader = await asyncio.to_thread(cluster.leader_of, topology.queue)
        mark(f"stopping {leader}, the jobs queue's leader")
        await asyncio.to_thread(cluster.stop, leader)
        mark(f"{leader} stopped")
        answered = len(results)
        await wait_for(lambda: len(results) >= answered + 10, RECOVERY_S, "progress with the leader gone")
        mark(f"new leader {await asyncio.to_thread(cluster.leader_of, topology.queue)}; starting {leader}")
        await asyncio.to_thread(cluster.start, leader)
        mark(f"{leader} back")

        target = worker_node(cluster, worker)
        mark(f"stopping {target}, the worker's node")
        await asyncio.to_thread(cluster.stop, target)
        mark(f"{target} stopped")
        await wait_for(lambda: worker_node(cluster, worker) != target, RECOVERY_S, "worker reconnected")
        mark(f"worker reconnected to {worker_node(cluster, worker)}")

        await asyncio.wait_for(publishing, RECOVERY_S)
        await asyncio.wait_for(asyncio.gather(*tasks), 240)
        mark("every job answered")
        await asyncio.to_thread(cluster.start, target)

        assert errors == {}, errors
        assert len(results) == JOBS  # each generate returned exactly one result
        assert all(r.generated_text == expected_text(p) for p, r in results.items())
        assert worker.proc.poll() is None, worker.output
        reconnects = worker.events("amqp_reconnected")
        assert reconnects, worker.output
        connection = await aio_pika.connect(cluster.urls[0])
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(topology.dead_queue, passive=True)
            assert dead.declaration_result.message_count == 0  # nothing dead-lettered
        recomputed = len(worker.events("batch_submitted"))
        client_log = [r.getMessage().split()[0] for r in caplog.records if r.name == "consumer.client"]
        print("\n" + "\n".join(timeline))
        print(f"{JOBS} jobs, {len(results)} answered once each, 0 errors, 0 dead-lettered; worker "
              f"reconnects {len(reconnects)}, joined in flight {len(worker.events('job_joined_inflight'))}, "
              f"answered from cache {len(worker.events('job_answered_from_cache'))}, groups submitted "
              f"{recomputed}; client: {client_log.count('job_republished')} jobs republished after its "
              f"reconnect, {client_log.count('publish_retry')} publishes retried; test "
              f"{time.monotonic() - began:.1f} s (cluster boot {cluster.boot_s:.1f} s, once per session)")
    except BaseException:
        print("\n".join(timeline), "\n--- worker output (tail)\n", worker.output[-20000:])
        raise
    finally:
        for task in tasks:
            task.cancel()
        await client.close()
        worker.kill()

