"""loraq consumer side: wire protocol, client, worker service. Never imports torch.

`from consumer import Client` works without loading aio-pika for code that needs only the protocol:
the client names below are imported on first use.
"""

from __future__ import annotations

from typing import Any

_CLIENT_NAMES = frozenset({
    "Client", "SyncClient", "GenerationResult", "Token", "LoraqError", "UnroutableError",
    "GenerationTimeout", "GenerationError",
})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from consumer import client
        return getattr(client, name)
    raise AttributeError(f"module 'consumer' has no attribute {name!r}")


__all__ = sorted(_CLIENT_NAMES)
