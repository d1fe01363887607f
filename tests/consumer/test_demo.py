"""`loraq demo` and its worker subprocess plumbing (`consumer.worker_process`): flags that rebuild
the topology in the worker process, adapter discovery, and the demo's whole life (worker
subprocess, health wait, jobs through the broker, SIGTERM) on a worker that runs the fake engine.
The benchmarks' own tests are in tests/benchmarks/."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest

from consumer import demo
from consumer.protocol import Topology
from consumer.settings import WorkerSettings
from consumer.worker_process import WorkerProcess, delete_topology, free_port, topology_args
from tests.amqp_helpers import AMQP_URL
from tests.fake_engine import expected_text

ROOT = Path(__file__).resolve().parents[2]


def test_topology_args_rebuild_the_topology() -> None:
    topology = Topology.prefixed("loraq-demo-x", delivery_limit=3)
    assert WorkerSettings.from_args(topology_args(topology), env={}).topology == topology


def test_find_adapters(tmp_path: Path) -> None:
    for name in ("pirate", "nested/caps"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "not_an_adapter").mkdir()
    assert demo.find_adapters(tmp_path) == ["nested/caps", "pirate"]


def test_demo_runs_a_worker_end_to_end(tmp_path: Path, monkeypatch, capsys) -> None:
    """The whole demo against a worker process on the fake engine (needs RabbitMQ)."""
    for name in ("demo/pirate", "demo/caps"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(demo, "WORKER_COMMAND",
                        (sys.executable, str(ROOT / "tests" / "worker_script.py")))
    assert demo.main(["--adapter-root", str(tmp_path), "--max-new-tokens", "64",
                      "--start-timeout", "60", "--timeout", "30"]) == 0
    out = capsys.readouterr().out
    jobs = len(demo.PROMPTS) * 3
    assert f"{jobs}/{jobs} jobs answered" in out
    for adapter in ("demo/pirate", "demo/caps", None):
        assert expected_text(demo.PROMPTS[0], adapter) in out
    streamed = out.split("streaming from demo/pirate:", 1)[1]
    assert "<demo/pirate>" in streamed and "tokens streamed" in streamed
    assert "worker exited with code 0" in out


def test_demo_fails_cleanly_when_the_worker_cannot_start(tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.setattr(demo, "WORKER_COMMAND", (sys.executable, "-c", "raise SystemExit(3)"))
    assert demo.main(["--adapter-root", str(tmp_path), "--start-timeout", "30"]) == 1
    assert "exited with code 3" in capsys.readouterr().err


def test_worker_process_reports_an_early_exit(tmp_path: Path) -> None:
    """wait_healthy gives up as soon as the child exits, with the end of its log; stop() after
    that returns its exit code."""
    worker = WorkerProcess(["--ignored"], tmp_path / "worker.log", free_port(),
                           command=(sys.executable, "-c", "print('booting'); raise SystemExit(4)"))
    worker.start()
    with pytest.raises(RuntimeError, match=r"exited with code 4(.|\n)*booting"):
        asyncio.run(worker.wait_healthy(30))
    assert worker.stop() == 4
    assert worker.last_status() == "booting"


async def test_delete_topology_removes_its_objects() -> None:
    topology = Topology.prefixed(f"loraq-demo-del-{uuid.uuid4().hex[:8]}")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.DIRECT)
        await channel.declare_queue(topology.queue)
        await delete_topology(AMQP_URL, topology)
        for declare in (lambda ch: ch.declare_queue(topology.queue, passive=True),
                        lambda ch: ch.declare_exchange(topology.exchange, passive=True)):
            probe = await connection.channel()
            try:
                await declare(probe)
                raise AssertionError("a topology object outlived delete_topology")
            except aio_pika.exceptions.ChannelClosed:
                pass
