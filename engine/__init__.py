"""loraq engine: many LoRA adapters, one base model, one packed forward per step.

Importing this package imports no torch: the consumer uses `engine.request` and `engine.config`
without it. Names below resolve on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "engine.engine",
    "EngineConfig": "engine.config",
    "AdapterRef": "engine.request",
    "EngineError": "engine.request",
    "ErrorType": "engine.request",
    "GenerationFailure": "engine.request",
    "GenerationRequest": "engine.request",
    "Lease": "engine.lease",
    "Completion": "engine.request",
    "SamplingParams": "engine.request",
    "Timings": "engine.request",
    "TokenEvent": "engine.request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
