"""Bounded LRU of finished jobs by job id, so a redelivered job is answered, not recomputed."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedOutcome:
    """A job's final reply. Kept as a map, not bytes: a duplicate may use another content type.
    Token messages are not kept (bounded memory): a redelivery gets the final reply alone."""

    reply_type: str  # "result" | "error"
    body: dict
    dead_lettered: bool  # its copy already sits in the dead-letter queue: don't add another


class ResultCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedOutcome] = OrderedDict()

    def get(self, job_id: str) -> CachedOutcome | None:
        outcome = self._entries.get(job_id)
        if outcome is not None:
            self._entries.move_to_end(job_id)
        return outcome

    def put(self, job_id: str, outcome: CachedOutcome) -> None:
        self._entries[job_id] = outcome
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries
