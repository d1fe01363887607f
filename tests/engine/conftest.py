"""Fixtures of the engine tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_engine(tiny_model_dirs, loaded_models):
    """`make_engine(arch="llama", **config)`: an Engine on the session's tiny `arch` model (its
    weights loaded once and shared), shut down after the test."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    engines: list[Engine] = []

    def make(arch: str = "llama", **config) -> Engine:
        engine = Engine(EngineConfig(model=str(tiny_model_dirs[arch]), **config), model=loaded_models(arch))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout=10)
