"""Shared fixtures: tiny random model dirs (built once per session), their HF references, and a
helper that runs requests through an engine and collects every outcome."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.builders import make_tiny_model

ARCHS = ("llama", "mistral", "qwen2")


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


def run_requests(engine, requests, timeout: float = 60.0, on_token=None) -> dict:
    """Submit all requests, wait for every on_finish; request id -> outcome. Fails on a second
    on_finish for one request."""
    outcomes: dict = {}
    done = threading.Event()
    lock = threading.Lock()

    def finish(outcome) -> None:
        with lock:
            assert outcome.request_id not in outcomes, f"two on_finish for {outcome.request_id}"
            outcomes[outcome.request_id] = outcome
            if len(outcomes) == len(requests):
                done.set()

    for request in requests:
        engine.submit(request, on_token, finish)
    assert done.wait(timeout), f"only {len(outcomes)}/{len(requests)} requests finished"
    return outcomes


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
