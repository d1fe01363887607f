"""Liveness and readiness: /livez answers from before the model loads until the process exits;
/readyz (and /healthz, its old name) only while the worker consumes and its engine's step loop goes
round (`heartbeat_age_s` within --engine-stall-s)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from consumer import cli
from consumer.worker import Worker
from tests.amqp_helpers import WorkerProcess, wait_for, worker_args, worker_settings
from tests.fake_engine import FakeEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port: int, path: str) -> int | None:
    """HTTP status of GET path, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


async def statuses(port: int) -> dict[str, int | None]:
    return {p: await asyncio.to_thread(status, port, p) for p in ("/livez", "/readyz", "/healthz")}


class Stats:
    """An engine's stats() and nothing else."""

    def __init__(self, stats) -> None:
        self.stats = stats


def test_an_engine_without_a_heartbeat_counts_as_alive(topology):
    settings = worker_settings(topology, engine_stall_s=1.0)
    assert Worker(settings, Stats(lambda: {"running": 0})).engine_alive()  # type: ignore[arg-type]
    assert Worker(settings, Stats(lambda: {"heartbeat_age_s": 0.5})).engine_alive()  # type: ignore[arg-type]
    assert not Worker(settings, Stats(lambda: {"heartbeat_age_s": 1.5})).engine_alive()  # type: ignore[arg-type]

    def broken() -> dict:
        raise RuntimeError("engine gone")

    assert not Worker(settings, Stats(broken)).engine_alive()  # type: ignore[arg-type]


async def test_a_stalled_engine_loop_turns_the_worker_not_ready(app, topology):
    """A step that does not return (here: 2.5 s against a 0.5 s bound) makes /readyz 503 while
    /livez stays 200; readiness comes back once the loop goes round again."""
    port = free_port()
    engine = FakeEngine(slow={"hang": 2.5})
    worker = Worker(worker_settings(topology, engine_stall_s=0.5, metrics_port=port,
                                    metrics_host="127.0.0.1"), engine)
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(worker.ready, 10, "worker ready")
        assert await statuses(port) == {"/livez": 200, "/readyz": 200, "/healthz": 200}
        cid = await app.publish(inputs="x", parameters={"adapter_id": "hang", "max_new_tokens": 1})
        await wait_for(lambda: not worker.ready(), 5, "not ready while the step hangs")
        assert await statuses(port) == {"/livez": 200, "/readyz": 503, "/healthz": 503}
        await app.wait(cid, timeout=10)
        await wait_for(worker.ready, 5, "ready again")
        assert (await statuses(port))["/readyz"] == 200
    finally:
        worker.stop()
        await task
        engine.shutdown(2)


@pytest.mark.slow
async def test_live_while_the_model_loads_and_sigterm_then_exits_at_once(topology):
    """The metrics server starts before the engine is built: during a (fake, 60 s) model load
    /livez is 200 and /readyz 503 (`loraq health --live` / `loraq health`); a SIGTERM then ends the
    process without waiting for the load."""
    port = free_port()
    proc = WorkerProcess(worker_args(topology, "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                                     "--fake-build-s", "60", "--shutdown-grace-s", "5"))
    try:
        await wait_for(lambda: status(port, "/livez") == 200 or proc.proc.poll() is not None, 20,
                       "liveness while loading")
        assert await statuses(port) == {"/livez": 200, "/readyz": 503, "/healthz": 503}, proc.output
        assert await asyncio.to_thread(cli.main, ["health", "--live", "--port", str(port)]) == 0
        assert await asyncio.to_thread(cli.main, ["health", "--port", str(port)]) == 1
        assert proc.events("engine_loading") and not proc.events("worker_started")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert await proc.wait(20) == 0, proc.output
        print(f"\nSIGTERM while the model loads: exited after {time.monotonic() - sent:.2f} s")
        assert proc.events("worker_stopped_while_loading"), proc.output
    finally:
        proc.kill()
