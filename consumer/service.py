"""Process entry points: `loraq worker` / `python -m consumer` (main), `loraq health` (health_main),
and run_worker, which runs one worker until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiormq.exceptions
import structlog

from consumer.logging import configure_logging
from consumer.metrics import probe
from consumer.settings import WorkerSettings
from consumer.worker import EngineLike, Worker

log = structlog.get_logger(__name__)


def build_engine(settings: WorkerSettings) -> EngineLike:
    """The real engine (imports torch; takes a while: the model loads here)."""
    from engine.engine import Engine

    return Engine(settings.engine_config())


async def run_worker(settings: WorkerSettings, engine: EngineLike | None = None) -> None:
    """Run a worker until SIGTERM / SIGINT, then drain and return. Builds the engine when none is
    given (and shuts down only an engine it built)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    owned = engine is None
    worker: Worker | None = None
    try:
        if engine is None:
            log.info("engine_loading", model=settings.engine.model, device=settings.engine.device,
                     dtype=settings.engine.dtype)
            engine = await asyncio.to_thread(build_engine, settings)
        if stop.is_set():
            return
        candidate = Worker(settings, engine)
        await candidate.start()  # raises if the broker is unreachable or the topology conflicts
        worker = candidate
        await stop.wait()
    finally:
        if worker is not None:
            await worker.drain()
        if owned and engine is not None:
            await asyncio.to_thread(engine.shutdown, 5.0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """`loraq worker` / `python -m consumer`."""
    try:
        settings = WorkerSettings.from_args(argv)
    except ValueError as e:
        print(f"loraq worker: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(run_worker(settings))
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as e:  # broker unreachable
        log.error("worker_failed", error=f"{type(e).__name__}: {e}")
        return 1
    except Exception:  # e.g. the model or the engine config failed to load
        log.exception("worker_failed")
        return 1
    return 0


def health_main(argv: list[str] | None = None) -> int:
    """`loraq health` / `python -m consumer health`: exit 0 when the local worker is healthy."""
    parser = argparse.ArgumentParser(prog="loraq health",
                                     description="exit 0 if the worker's /healthz answers 200")
    parser.add_argument("--port", type=int, default=None,
                        help="metrics port (default LORAQ_METRICS_PORT or 9090)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else WorkerSettings.from_args([]).metrics_port
    ok = probe(port, args.host)
    print("healthy" if ok else "unhealthy", file=sys.stderr)
    return 0 if ok else 1
