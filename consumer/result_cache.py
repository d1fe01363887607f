"""Bounded LRU of finished jobs' final replies by job id, so a redelivered job is answered, not
recomputed. Replies are kept typed, not as bytes: a duplicate may ask for another content type.
Token replies are not kept (bounded memory): a redelivery gets the final reply alone."""

from __future__ import annotations

from collections import OrderedDict

from consumer.protocol import FinalReply


class ResultCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, FinalReply] = OrderedDict()

    def get(self, job_id: str) -> FinalReply | None:
        reply = self._entries.get(job_id)
        if reply is not None:
            self._entries.move_to_end(job_id)
        return reply

    def put(self, job_id: str, reply: FinalReply) -> None:
        self._entries[job_id] = reply
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries
