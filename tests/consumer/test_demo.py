"""`loraq demo` and `loraq bench e2e` plumbing: flags that rebuild the same settings in the worker
process, adapter discovery, percentiles, and the demo's whole life (worker subprocess, health wait,
jobs through the broker, SIGTERM) on a worker that runs the fake engine."""

from __future__ import annotations

import sys
from pathlib import Path


from consumer import demo
from consumer.bench_e2e import percentile, worker_args
from consumer.protocol import Topology
from consumer.settings import WorkerSettings
from tests.fake_engine import expected_text

ROOT = Path(__file__).resolve().parents[2]


def test_topology_args_rebuild_the_topology() -> None:
    topology = Topology.prefixed("loraq-demo-x", delivery_limit=3)
    assert WorkerSettings.from_args(demo.topology_args(topology), env={}).topology() == topology


def test_worker_args_rebuild_the_settings() -> None:
    settings = WorkerSettings(model="some/model", adapter_root="/tmp/a", max_batch=16,
                              prefetch=64, batch_window_ms=2.5, hub_enabled=True,
                              hub_allow_orgs=("acme", "org2"), metrics_port=1234)
    args = worker_args(settings)
    assert "--metrics-port" not in args  # WorkerProcess picks the port
    assert WorkerSettings.from_args(args, env={}) == WorkerSettings(
        **{**settings.__dict__, "metrics_port": WorkerSettings.metrics_port})


def test_find_adapters(tmp_path: Path) -> None:
    for name in ("pirate", "nested/caps"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "not_an_adapter").mkdir()
    assert demo.find_adapters(tmp_path) == ["nested/caps", "pirate"]


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    assert percentile([7.0], 99) == 7.0


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


def test_bench_report_compares_the_paths() -> None:
    import argparse

    from consumer.bench_e2e import Run, report

    def run(path: str, load: str, outside_ms: float) -> Run:
        return Run(path, load, [2.0], [100.0, 200.0], [1.0, 1.0], [outside_ms] * 2, [4, 4],
                   ["a", "b" if path == "engine" else "c"])

    runs = {(p, load): run(p, load, 0.0 if p == "engine" else 3.0)
            for p in ("engine", "rabbitmq") for load in ("burst", "serial")}
    args = argparse.Namespace(jobs=2, adapters=1, rank=4, targets="q_proj", prompt_tokens=70,
                              new_tokens=4, json_out=None)
    table, numbers = report(args, WorkerSettings(), "cpu", runs, [2.0, 2.5, 9.0])
    assert numbers["summary"]["serial_p50_overhead_ms"] == 3.0
    assert numbers["summary"]["broker_floor_p50_ms"] == 2.5
    assert "loraq's own share: +0.5 ms" in table
    assert numbers["summary"]["identical_texts_burst"] == "1/2"
    assert "[target < 5 ms: met]" in table and "[target >= 0.95: met]" in table


async def test_broker_floor_echo_round_trips() -> None:
    """The e2e bench's broker floor: a bare echo in another process answers through a quorum
    queue, and its queue is gone afterwards."""
    import aio_pika

    from consumer.bench_e2e import BrokerFloor
    from tests.amqp_helpers import AMQP_URL

    async with BrokerFloor(AMQP_URL) as floor:
        for _ in range(3):
            await floor.round_trip()
    assert len(floor.round_trips_ms) == 3 and all(t > 0 for t in floor.round_trips_ms)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(floor.queue, passive=True)
            raise AssertionError(f"{floor.queue} outlived the bench")
        except aio_pika.exceptions.ChannelClosed:
            pass
