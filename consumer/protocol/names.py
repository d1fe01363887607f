"""Topology: the names of the protocol's AMQP objects (consumer.topology declares them)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Topology:
    """Names of the AMQP objects of the protocol. Tests give each run its own via `prefixed`."""

    exchange: str = "loraq"  # direct: backend apps publish jobs here
    queue: str = "loraq.generate"  # quorum queue
    routing_key: str = "generate"
    dlx: str = "loraq.dlx"  # fanout
    dead_queue: str = "loraq.dead"
    results_exchange: str = "loraq.results"  # topic: results of jobs without reply_to
    retry_queue: str = "loraq.retry"  # quorum: failed jobs wait out their backoff here, then go back
    # fanout of cancel messages, one exclusive queue per worker bound to it; "" means
    # `<exchange>.cancel`, so a publisher that knows the jobs exchange knows this one too
    cancel_exchange: str = ""
    # adapter affinity only (workers started with --affinity): x-consistent-hash on x-adapter-id,
    # and the fanout that leads back to the jobs queue (its alternate exchange and the workers' DLX)
    affinity_exchange: str = "loraq.affinity"
    affinity_fallback: str = "loraq.affinity.fallback"
    delivery_limit: int = 5  # quorum x-delivery-limit: deliveries before the broker dead-letters

    def __post_init__(self) -> None:
        if self.delivery_limit < 1:
            raise ValueError("delivery_limit must be >= 1")
        if not self.cancel_exchange:
            object.__setattr__(self, "cancel_exchange", f"{self.exchange}.cancel")

    @classmethod
    def prefixed(cls, prefix: str, **overrides: Any) -> Topology:
        """Every name under `prefix` (e.g. a unique test id), routing key unchanged."""
        names = {f.name: f"{prefix}.{f.default}" for f in fields(cls)
                 if f.name not in ("routing_key", "delivery_limit", "cancel_exchange")}
        return cls(**{**names, **overrides})

    def result_routing_key(self, adapter_id: str | None) -> str:
        return f"result.{adapter_id or 'base'}"

    def worker_queue(self, worker_id: str) -> str:
        """One affinity worker's own queue."""
        return f"{self.queue}.worker.{worker_id}"

    def cancel_queue(self, worker_id: str) -> str:
        """One worker's own queue of cancel messages."""
        return f"{self.cancel_exchange}.worker.{worker_id}"
