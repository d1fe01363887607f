"""A byte-budget LRU: the books of one adapter tier (host RAM, disk cache). No torch import."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries (a value and its size in bytes), least recently used first, and their total
    against a byte budget. The owner decides which entries may leave (`evict`'s predicate) and
    locks: this class is not thread-safe."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        """A snapshot, least recently used first."""
        return list(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    @property
    def over_budget(self) -> bool:
        return self.nbytes > self.budget

    @property
    def mean_nbytes(self) -> float:
        """The average entry's size (0 when empty): the estimate for one of unknown size."""
        return self.nbytes / len(self._entries) if self._entries else 0.0

    def put(self, key: K, value: V, nbytes: int) -> None:
        """Insert or replace `key`, as the most recently used. May leave the LRU over budget."""
        self.pop(key)
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes

    def touch(self, key: K) -> None:
        """Make `key` the most recently used, if present."""
        if key in self._entries:
            self._entries.move_to_end(key)

    def pop(self, key: K) -> tuple[V, int] | None:
        """Remove `key`; its (value, nbytes), or None if absent."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]
        return entry

    def evict(self, may_evict: Callable[[K], bool]) -> list[tuple[K, V, int]]:
        """Remove entries, least recently used first, skipping those `may_evict` refuses, until
        the total is within budget or none is left to try. The removed (key, value, nbytes)."""
        evicted = []
        for key in self.keys():
            if not self.over_budget:
                break
            if may_evict(key):
                value, nbytes = self._entries.pop(key)
                self.nbytes -= nbytes
                evicted.append((key, value, nbytes))
        return evicted
