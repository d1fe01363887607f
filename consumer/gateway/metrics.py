"""Prometheus metrics of one gateway, recorded by one middleware around every request.

`loraq_gateway_requests_total{route, method, status}` counts answers (a streamed request counts
when its stream ends, with the status it started with; a client that went away counts as 499),
`loraq_gateway_request_seconds{route}` times them (for streams: until the last event),
`loraq_gateway_inflight_requests` and `loraq_gateway_inflight_jobs` show the load now. `route` is
the matched route pattern (unmatched paths share one label), so labels stay few.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from consumer.metrics import LATENCY_BUCKETS

CLIENT_CLOSED = 499  # nginx's code for "client closed the request"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewayMetrics:
    def __init__(self, inflight_jobs: Callable[[], int] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loraq_gateway_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("loraq_gateway_request_seconds", "HTTP request to last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("loraq_gateway_inflight_requests", "HTTP requests being answered",
                              registry=r)
        self.disconnects = Counter("loraq_gateway_client_disconnects",
                                   "requests whose client went away before the answer", registry=r)
        self.reconnects = Counter("loraq_gateway_reconnects", "AMQP connection re-established",
                                  registry=r)
        if inflight_jobs is not None:
            jobs = Gauge("loraq_gateway_inflight_jobs", "jobs published and not yet answered",
                         registry=r)
            jobs.set_function(lambda: float(inflight_jobs()))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        start = time.perf_counter()
        status = 500
        self.inflight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            self.disconnects.inc()
            raise
        finally:
            self.inflight.dec()
            self.requests.labels(route, request.method, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - start)
