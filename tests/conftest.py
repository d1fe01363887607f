"""Shared fixtures only: tiny random model dirs (built once per session), their HF references,
a throwaway broker topology and a plain aio-pika app on it. Helpers live in tests/builders.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.builders import ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch -> a tiny random model dir (2 layers, hidden 64, GQA 4/2), plus "mistral_sliding":
    the Mistral model with an 8-token sliding window."""
    root = tmp_path_factory.mktemp("models")
    dirs = {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}
    sliding = root / "mistral_sliding"
    shutil.copytree(dirs["mistral"], sliding)
    config = json.loads((sliding / "config.json").read_text())
    config["sliding_window"] = 8
    (sliding / "config.json").write_text(json.dumps(config))
    dirs["mistral_sliding"] = sliding
    return dirs


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def hf_models(tiny_model_dirs):
    """arch -> the plain transformers model (fp32, eval), loaded once: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32).eval()
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def loaded_models(tiny_model_dirs):
    """arch -> LoadedModel, loaded once (the engine references the weights, never changes them)."""
    from engine.config import EngineConfig
    from engine.model_loader import load_model

    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(EngineConfig(model=str(tiny_model_dirs[arch])))
        return cache[arch]

    return get


@pytest.fixture
async def topology():
    """A throwaway broker topology (unique names, delivery limit 2), deleted after the test."""
    from tests.amqp_helpers import delete_topology, unique_topology

    t = unique_topology(delivery_limit=2)
    yield t
    await delete_topology(t)


@pytest.fixture
async def app(topology):
    """A plain aio-pika backend app publishing to `topology` and reading its replies."""
    from tests.amqp_helpers import App

    a = await App(topology).open()
    yield a
    await a.close()


@pytest.fixture
def restore_logging():
    """For a test whose code calls consumer.logging.configure_logging: structlog and the root
    logger go back to their defaults after it, so later tests never write to a stream it bound
    (pytest's capture of that test, closed by then)."""
    import structlog

    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


@pytest.fixture(scope="session")
def rabbit_cluster_session(tmp_path_factory):
    """A 3-node RabbitMQ cluster on this host (tests/cluster.py), started once per session."""
    from tests.cluster import RabbitCluster, find_scripts

    if find_scripts() is None:
        pytest.skip("needs rabbitmq-server and rabbitmqctl on this host")
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit_cluster"))
    cluster.start_cluster()
    yield cluster
    cluster.close()


@pytest.fixture
def rabbit_cluster(rabbit_cluster_session):
    """The session's cluster, every node running; the nodes a test stopped are started after it."""
    yield rabbit_cluster_session
    rabbit_cluster_session.start_stopped()
