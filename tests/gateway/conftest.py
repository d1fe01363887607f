"""Gateway fixtures: one fake-engine worker and one gateway per test module, on a throwaway
topology (the fake engine's output is known in advance: tests/fake_engine.expected_text)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.amqp_helpers import delete_topology, unique_topology
from tests.gateway.harness import GatewayThread, gateway_settings, start_fake_worker

FAKE_FLAGS = ("--fake-step-s", "0.002",
              "--fake-fail", "missing=adapter_not_found",
              "--fake-fail", "busy=overloaded:retryable",
              "--fake-slow", "slow=1.5")
ADAPTERS = ("acme/support", "acme/sales", "pirate")  # listed by /v1/models


@pytest.fixture(scope="module")
def fake_topology():
    t = unique_topology()
    yield t
    asyncio.run(delete_topology(t))


@pytest.fixture(scope="module")
def fake_worker(fake_topology):
    worker = start_fake_worker(fake_topology, *FAKE_FLAGS)
    yield worker
    worker.kill()


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name in ADAPTERS:
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (root / "not-an-adapter").mkdir()
    return root


@pytest.fixture(scope="module")
def gateway(fake_topology, fake_worker, adapter_root):
    """A gateway on the fake worker's topology, listing `adapter_root`."""
    g = GatewayThread(gateway_settings(fake_topology, adapter_root=str(adapter_root)))
    yield g
    g.stop()
