"""Prometheus metrics of one worker and the tiny HTTP server that serves them with its probes.

`GET /metrics`: the registry (plus the engine's `stats()` numbers as `loraq_engine_*` gauges).
`GET /livez`: 200 while the process serves, from before the model loads until it exits (liveness).
`GET /readyz`: 200 while the worker is connected, consuming, and its engine's step loop alive,
else 503 (readiness); `GET /healthz` is the same, for older probes. Both are served by the worker's
own event loop, so a blocked loop fails them too. `probe()` is the docker-compose healthcheck
(`loraq health` / `python -m consumer health`)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                   120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineStatsCollector:
    """`engine.stats()` read at scrape time: the adapter store's per-tier hits / misses as
    `loraq_adapter_cache_total{tier, result}`, every other number (nested maps flattened with `_`)
    as a `loraq_engine_*` gauge."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        try:
            stats = self._stats()
        except Exception:  # a scrape must not fail because the engine is starting or gone
            return
        cache = CounterMetricFamily("loraq_adapter_cache", "adapter lookups per store tier",
                                    labels=["tier", "result"])
        for tier, counts in (stats.get("adapters") or {}).items():
            if isinstance(counts, dict) and "hits" in counts:
                cache.add_metric([tier, "hit"], counts["hits"])
                cache.add_metric([tier, "miss"], counts.get("misses", 0))
        yield cache
        for name, value in sorted(_flatten(stats).items()):
            yield GaugeMetricFamily(f"loraq_engine_{name}", f"engine stats: {name}", value=value)


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = "".join(c if c.isalnum() else "_" for c in f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        elif isinstance(v, (int, float)):  # bools count as 0 / 1
            out[key] = float(v)
    return out


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.jobs_received = Counter("loraq_jobs_received", "jobs delivered to this worker",
                                     ["content_type"], registry=r)
        self.jobs_routed = Counter(
            "loraq_jobs_routed", "jobs delivered, by the queue they came from",
            ["route"], registry=r)  # shared | affinity (this worker's own queue, --affinity)
        self.jobs_finished = Counter(
            "loraq_jobs_finished", "deliveries settled, by how",
            ["outcome"], registry=r)  # result | cached | retried | returned | dead_lettered | lost
        self.errors = Counter("loraq_errors", "error replies by error_type", ["error_type"],
                              registry=r)
        self.queue_wait = Histogram("loraq_queue_wait_seconds",
                                    "engine queue wait (submit to first scheduled step)",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.broker_wait = Histogram("loraq_broker_wait_seconds",
                                     "publish (AMQP timestamp) to delivery, when the job has one",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraq_ttft_seconds", "time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.job_latency = Histogram("loraq_job_seconds", "delivery to final reply confirmed",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram(
            "loraq_job_tokens_per_second", "generated tokens / decode time, per job",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.generated_tokens = Counter("loraq_generated_tokens", "tokens generated", registry=r)
        self.batch_size = Histogram("loraq_batch_size", "jobs per submitted group",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_adapters = Histogram("loraq_batch_adapters",
                                        "distinct adapters (base counts as one) per group",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.inflight = Gauge("loraq_inflight_jobs", "jobs held (collected or in the engine)",
                              registry=r)
        self.reconnects = Counter("loraq_reconnects", "AMQP connection re-established", registry=r)

    def watch_engine(self, stats: Callable[[], dict]) -> None:
        self.registry.register(EngineStatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _not_yet() -> bool:
    return False


READY_PATHS = ("/readyz", "/healthz")


class MetricsServer:
    """HTTP/1.0, GET only, on the worker's loop: /metrics, /livez, /readyz and /healthz. `ready`
    answers readiness; it can be set once the worker exists (until then: not ready)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool] = _not_yet) -> None:
        self._metrics = metrics
        self.ready = ready
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, body, ctype = 200, self._metrics.render(), "text/plain; version=0.0.4"
            elif path == "/livez":
                status, body, ctype = 200, b"live\n", "text/plain"
            elif path in READY_PATHS:
                ok = self.ready()
                status, body, ctype = (200 if ok else 503), (b"ready\n" if ok else b"not ready\n"), \
                    "text/plain"
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


def probe(port: int = 9090, host: str = "127.0.0.1", timeout: float = 3.0, path: str = "/readyz") -> bool:
    """True when the worker at host:port answers `path` (/readyz, /livez) with 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False

