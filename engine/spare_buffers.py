"""Spare read buffers for adapter files, faulted in ahead of the load that needs one.

A new adapter's file is read into a new buffer, which must stay (the host tier keeps its
weights). Its pages come fresh from the OS and are faulted in during the load: measured ~5 ms of
a 7-8 ms in-engine load of a 3.7 MB adapter whose file is in the page cache (a plain read of it:
0.8 ms). After each load the loader thread makes one spare of each size just read, off the
critical path (the engine is already woken, and torch zeroes the memory without holding the
GIL), so the next load of an adapter that size reads into pages already there. Bounded by
MAX_BYTES in all; thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import Tensor

MAX_BYTES = 64 * 2**20  # spares held at most, all sizes together (the least recently needed go first)


class SpareBuffers:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._spares: OrderedDict[int, Tensor] = OrderedDict()  # size -> one spare, least recent first
        self._wanted: OrderedDict[int, None] = OrderedDict()  # sizes taken since the last refill
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Tensor:
        """A zeroed [nbytes] uint8 CPU tensor: the spare of that size if one is ready, else a new one."""
        with self._lock:
            spare = self._spares.pop(nbytes, None)
            self._wanted[nbytes] = None
            self._wanted.move_to_end(nbytes)
        return spare if spare is not None else torch.zeros(nbytes, dtype=torch.uint8)

    def refill(self) -> None:
        """One spare of each size taken since the last call, as far as max_bytes allows (made in
        the order taken, so the least recently taken go first); zeroing it faults its pages in here."""
        while True:
            with self._lock:
                if not self._wanted:
                    return
                nbytes, _ = self._wanted.popitem(last=False)
                if nbytes in self._spares or nbytes > self.max_bytes:
                    continue
            spare = torch.zeros(nbytes, dtype=torch.uint8)  # outside the lock: the slow part
            with self._lock:
                self._spares[nbytes] = spare
                while self._held() > self.max_bytes:
                    self._spares.popitem(last=False)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._held()

    def _held(self) -> int:
        return sum(t.numel() for t in self._spares.values())
