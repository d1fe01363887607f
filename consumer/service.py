"""Process entry points: `loraq worker` / `python -m consumer` (main), `loraq health` (health_main),
and run_worker, which runs one worker until SIGTERM / SIGINT.

The life of a worker process, and its probes on --metrics-port:

    start ── metrics server up: /livez 200, /readyz 503 ── engine built (the model loads: minutes)
          ── worker consuming: /readyz 200 (while the engine's loop goes round) ── SIGTERM
          ── drain: /readyz 503, in-flight jobs finish or are returned ── engine stopped ── exit

Shutdown budget. On SIGTERM the process exits within --shutdown-grace-s G, so an orchestrator whose
kill timeout is G never has to SIGKILL it: jobs in flight get G minus a reserve (a fifth of G, at
most 5 s) to finish; then the rest are cancelled on the engine and returned to the queue, the
connection closes, and the engine's shutdown gets what is left of G. Then the process ends at once
(os._exit): with torch loaded, the interpreter's own teardown takes seconds and does nothing a
stopped worker needs. A watchdog ends the process at G if any of that hangs (a step thread stuck
in a kernel, a loader thread in a download).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import aiormq.exceptions
import structlog

from consumer.logging import configure_logging
from consumer.metrics import Metrics, MetricsServer, probe
from consumer.settings import WorkerSettings
from consumer.worker import EngineLike, Worker

log = structlog.get_logger(__name__)

T = TypeVar("T")

ENGINE_RESERVE_MAX_S = 5.0  # of the grace, kept back from the drain for the engine's shutdown
EXIT_GRACE_EXCEEDED = 3  # exit status when the watchdog had to end the process


def build_engine(settings: WorkerSettings) -> EngineLike:
    """The real engine (imports torch; takes a while: the model loads here), warmed up before the
    worker consumes, so the first jobs after a start do not pay one-time costs (engine/warmup.py)."""
    from engine.engine import Engine

    engine = Engine(settings.engine_config())
    engine.warmup()
    return engine


def engine_reserve_s(grace_s: float) -> float:
    """The part of the grace kept for stopping the engine after the drain."""
    return min(ENGINE_RESERVE_MAX_S, 0.2 * grace_s)


def _on_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`fn(*args)` on a daemon thread: unlike asyncio.to_thread, a call that never returns cannot
    hold the process at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: nobody waits for it any more
            pass

    threading.Thread(target=run, name=getattr(fn, "__name__", "call"), daemon=True).start()
    return future


def _watchdog(grace_s: float) -> None:
    """End the process at `grace_s` from now, whatever it is doing (a daemon timer)."""
    def fire() -> None:
        log.error("shutdown_grace_exceeded", grace_s=grace_s)
        _exit_now(EXIT_GRACE_EXCEEDED)

    timer = threading.Timer(grace_s, fire)
    timer.daemon = True
    timer.start()


async def run_worker(settings: WorkerSettings, engine: EngineLike | None = None,
                     build: Callable[[WorkerSettings], EngineLike] = build_engine) -> None:
    """Run a worker until SIGTERM / SIGINT, then drain and return within --shutdown-grace-s.
    Builds the engine with `build` when none is given (and shuts down only an engine it built),
    with /livez already answering."""
    loop = asyncio.get_running_loop()
    grace = settings.shutdown_grace_s
    stop = asyncio.Event()
    stopped_at: list[float] = []

    def on_signal() -> None:
        if not stopped_at:
            stopped_at.append(time.monotonic())
            _watchdog(grace)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    metrics = Metrics()
    server = MetricsServer(metrics) if settings.metrics_port else None
    owned = engine is None
    worker: Worker | None = None
    try:
        if server is not None:
            port = await server.start(settings.metrics_host, settings.metrics_port)
            log.info("metrics_serving", port=port)
        if engine is None:
            log.info("engine_loading", model=settings.engine.model, device=settings.engine.device,
                     dtype=settings.engine.dtype)
            building = _on_daemon_thread(build, settings)
            stopping = asyncio.ensure_future(stop.wait())
            either: set[asyncio.Future[Any]] = {building, stopping}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not building.done():  # stopped while the model loads: nothing to drain
                log.info("worker_stopped_while_loading")
                return
            engine = building.result()
        if stop.is_set():
            return
        candidate = Worker(settings, engine, metrics=metrics, server=server)
        await candidate.start()  # raises if the broker is unreachable or the topology conflicts
        worker = candidate
        await stop.wait()
    finally:
        deadline = (stopped_at[0] if stopped_at else time.monotonic()) + grace
        if worker is not None:
            await worker.drain(deadline - engine_reserve_s(grace) - time.monotonic())
        if owned and engine is not None:
            await _stop_engine(engine, deadline - time.monotonic())
        if server is not None:
            await server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if stopped_at:
            log.info("worker_exit", grace_s=grace, after_s=round(time.monotonic() - stopped_at[0], 3))


async def _stop_engine(engine: EngineLike, budget_s: float) -> None:
    """engine.shutdown within `budget_s`; past it the process goes on exiting (the engine's
    threads are daemons)."""
    budget_s = max(0.0, budget_s)
    try:
        await asyncio.wait_for(_on_daemon_thread(engine.shutdown, budget_s), budget_s)
    except TimeoutError:
        log.warning("engine_shutdown_timeout", budget_s=round(budget_s, 3))


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
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, once everything is settled and flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def health_main(argv: list[str] | None = None) -> int:
    """`loraq health` / `python -m consumer health`: exit 0 when the local worker is ready (or,
    with --live, merely alive)."""
    parser = argparse.ArgumentParser(prog="loraq health",
                                     description="exit 0 if the worker's /readyz (or /livez) answers 200")
    parser.add_argument("--port", type=int, default=None,
                        help="metrics port (default LORAQ_METRICS_PORT or 9090)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--live", action="store_true",
                        help="liveness (/livez: the process serves, also while the model loads) "
                             "instead of readiness (/readyz: consuming, engine loop alive)")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else WorkerSettings.from_args([]).metrics_port
    path = "/livez" if args.live else "/readyz"
    ok = probe(port, args.host, path=path)
    print(("live" if args.live else "ready") if ok else ("not live" if args.live else "not ready"),
          file=sys.stderr)
    return 0 if ok else 1
