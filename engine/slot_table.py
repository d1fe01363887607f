"""The device slot table: which adapter version each slot of `LoraSlots` holds, the running
requests pinning it, and which slot to give up next. Bookkeeping only (no torch): the adapter
store copies the weights and locks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class _Slot:
    key: str | None = None  # AdapterRef.key; None: empty
    generation: int = -1  # the adapter version loaded into it
    pins: int = 0  # running requests using it: never evicted while > 0
    last_used: int = 0  # tick of its latest pin


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self._slots = [_Slot() for _ in range(num_slots)]
        self._slot_of: dict[str, int] = {}
        self._tick = 0

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    @property
    def num_pinned(self) -> int:
        return sum(s.pins > 0 for s in self._slots)

    def empty(self) -> int | None:
        """The first slot holding no adapter, or None."""
        return next((i for i, s in enumerate(self._slots) if s.key is None), None)

    def find(self, key: str) -> int | None:
        """The slot holding `key` (some version of it), or None."""
        return self._slot_of.get(key)

    def generation(self, slot: int) -> int:
        return self._slots[slot].generation

    def is_pinned(self, slot: int) -> bool:
        return self._slots[slot].pins > 0

    def holds(self, key: str, generation: int) -> bool:
        """True if a slot holds exactly this version of `key`."""
        slot = self._slot_of.get(key)
        return slot is not None and self._slots[slot].generation == generation

    def assign(self, slot: int, key: str, generation: int) -> None:
        """`slot` (empty, taken, or holding an older unpinned version of `key`) now holds `key`."""
        self._slots[slot] = _Slot(key, generation)
        self._slot_of[key] = slot

    def pin(self, slot: int) -> None:
        self._tick += 1
        self._slots[slot].pins += 1
        self._slots[slot].last_used = self._tick

    def unpin(self, key: str) -> bool:
        """Undo one `pin` of `key`'s slot; False if it holds no pin (a caller's bug)."""
        slot = self._slot_of.get(key)
        if slot is None or self._slots[slot].pins == 0:
            return False
        self._slots[slot].pins -= 1
        return True

    def take(self, wanted: Callable[[str], bool]) -> tuple[int, str | None] | None:
        """A slot to load into: an empty one, else the least recently used unpinned one, preferring
        adapters for which `wanted` is False (no request waits for them). Returns (slot, the key
        it held, now forgotten, or None if it was empty); None when every slot is pinned."""
        empty = self.empty()
        if empty is not None:
            return empty, None
        idle = [(i, s.key) for i, s in enumerate(self._slots) if s.pins == 0 and s.key is not None]
        if not idle:
            return None
        victim, old = min(idle, key=lambda item: (wanted(item[1]), self._slots[item[0]].last_used))
        del self._slot_of[old]
        self._slots[victim] = _Slot()
        return victim, old
