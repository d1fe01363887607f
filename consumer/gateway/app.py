"""The gateway's aiohttp application and process: `loraq gateway` (flags: `loraq gateway --help`).

Why aiohttp rather than FastAPI + uvicorn: the gateway is a thin, streaming translation layer on
the same asyncio loop as aio-pika, and aiohttp is one well-kept package that is the server (no
ASGI server beside it), streams server-sent events with a plain StreamResponse, and cancels a
request's handler when its client disconnects (`handler_cancellation`), which is how a gone client
stops its wait here. Request bodies are validated where the wire is (`protocol.job_body`) and
by small readers in each route family, so FastAPI's pydantic layer would add a second schema of
the same fields (and its 422 body shape, which both LoRAX's and OpenAI's clients would misread).

Middlewares, outermost first: metrics (every answer counted and timed), auth (bearer tokens),
errors (a GatewayError becomes the status and body its route family's clients parse).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import aiormq
import structlog
from aiohttp import web

from consumer import protocol
from consumer.gateway.auth import BearerAuth
from consumer.gateway.catalog import Catalog
from consumer.gateway.errors import GatewayError, is_openai_path
from consumer.gateway.lorax_routes import LoraxRoutes
from consumer.gateway.metrics import GatewayMetrics
from consumer.gateway.openai_routes import OpenAIRoutes
from consumer.gateway.settings import GatewaySettings
from consumer.gateway.tracker import JobTracker
from consumer.logging import configure_logging

log = structlog.get_logger("loraq.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHUTDOWN_GRACE_S = 30.0  # on SIGTERM: requests in flight get this long to finish


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    openai = is_openai_path(request.path)
    try:
        return await handler(request)
    except GatewayError as e:
        log.info("request_failed", path=request.path, kind=e.kind, error=e.message,
                 status=e.status(openai))
        return e.response(openai)
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("request_crashed", path=request.path)
        return GatewayError(protocol.INTERNAL, f"gateway error: {type(e).__name__}").response(openai)


class Gateway:
    """The HTTP server and its JobTracker. `start()` binds (port 0: any free port, see `.port`)."""

    def __init__(self, settings: GatewaySettings, tokens: frozenset[str] = frozenset()) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics(inflight_jobs=lambda: self.tracker.inflight)
        self.tracker = JobTracker(settings.amqp_url, settings.topology(),
                                  on_reconnect=self.metrics.reconnects.inc)
        self.auth = BearerAuth(tokens)
        self.app = self.build_app()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[self.metrics.middleware, self.auth.middleware,
                                           error_middleware])
        LoraxRoutes(self.tracker, self.settings).add_to(app)
        catalog = Catalog(self.settings.model, self.settings.adapter_root)
        OpenAIRoutes(self.tracker, self.settings, catalog).add_to(app)
        app.router.add_get("/metrics", self.serve_metrics)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def serve_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the broker connection is up (/health also needs a worker consuming)."""
        ok = self.tracker.connected
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        await self.tracker.start()
        try:
            # handler_cancellation: a client that disconnects cancels its handler (and so its wait)
            self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                         shutdown_timeout=SHUTDOWN_GRACE_S)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]
        log.info("gateway_started", url=self.url, amqp_url=self.settings.redacted_url(),
                 exchange=self.settings.exchange, auth=self.auth.enabled,
                 adapter_root=self.settings.adapter_root)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (SHUTDOWN_GRACE_S), close the broker."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.tracker.close()
        log.info("gateway_stopped")


async def run_gateway(settings: GatewaySettings, tokens: frozenset[str] = frozenset()) -> None:
    """Serve until SIGTERM / SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(settings, tokens)
    try:
        await gateway.start()
        await stop.wait()
    finally:
        await gateway.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """`loraq gateway`."""
    try:
        settings = GatewaySettings.from_args(argv)
        tokens = settings.load_tokens()
    except (ValueError, OSError) as e:
        print(f"loraq gateway: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(run_gateway(settings, tokens))
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as e:  # broker or port unusable
        log.error("gateway_failed", error=f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
