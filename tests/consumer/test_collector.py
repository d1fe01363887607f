"""Collector: window, max batch, and the idle fast path."""

from __future__ import annotations

import asyncio

from consumer.collector import Collector


async def test_groups_within_window_and_flushes_at_max_batch() -> None:
    groups: list[list[int]] = []
    c = Collector(0.05, 3, groups.append)
    c.add(1)
    c.add(2)
    assert groups == []  # waiting for the window
    await asyncio.sleep(0.1)
    assert groups == [[1, 2]]
    for i in (3, 4, 5):
        c.add(i)
    assert groups == [[1, 2], [3, 4, 5]]  # max batch flushes without waiting


async def test_job_finding_engine_idle_is_flushed_at_once() -> None:
    groups: list[list[int]] = []
    busy = False
    c = Collector(10.0, 8, groups.append, idle=lambda: not busy)
    c.add(1)
    assert groups == [[1]]  # no window wait when the engine has nothing to do
    busy = True
    c.add(2)
    c.add(3)
    assert groups == [[1]]  # engine busy: collect
    busy = False
    c.add(4)  # a group is already collecting: join it rather than jump ahead
    assert groups == [[1]]
    c.flush()
    assert groups == [[1], [2, 3, 4]]
