"""Groups jobs arriving close together so they reach the engine as one batch: the group is flushed
after `window_s` from its first job or as soon as it holds `max_batch` jobs, whichever comes first.
A job that finds the engine idle is flushed at once: waiting the window would only add latency,
and jobs arriving right after it join the running batch at the engine's next step anyway.
Lives on the event loop; no locks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Collector(Generic[T]):
    def __init__(self, window_s: float, max_batch: int, flush: Callable[[list[T]], None],
                 idle: Callable[[], bool] = lambda: False) -> None:
        self.window_s = window_s
        self.max_batch = max_batch
        self._flush = flush
        self._idle = idle
        self._items: list[T] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: T) -> None:
        idle = not self._items and self._idle()
        self._items.append(item)
        if idle or len(self._items) >= self.max_batch or self.window_s <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, []
        if items:
            self._flush(items)

    def drain(self) -> list[T]:
        """Take every waiting item without flushing (shutdown: they stay unacked)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, []
        return items

    def __len__(self) -> int:
        return len(self._items)
