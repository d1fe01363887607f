"""A hold on a shared resource, given back exactly once. No torch import: the consumer types
against it (`Engine.prefetch` returns one)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Lease:
    """`release` gives the hold back: the first call runs `on_release`, later calls do nothing.
    Thread-safe, so the owner may release it from whichever thread sees the end of its use."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._on_release is None

    def release(self) -> None:
        with self._lock:
            on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()
