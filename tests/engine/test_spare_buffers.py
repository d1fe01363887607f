"""engine/spare_buffers.py: a load takes a spare made ahead (its pages already faulted in)."""

from __future__ import annotations

import resource

import pytest

from engine.spare_buffers import SpareBuffers

MB = 2**20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_take_gives_the_spare_refill_made_of_that_size() -> None:
    spares = SpareBuffers()
    first = spares.take(3 * MB)
    assert first.numel() == 3 * MB and not first.any()
    assert spares.nbytes == 0  # nothing made ahead before a refill
    spares.refill()
    assert spares.nbytes == 3 * MB
    spare = spares._spares[3 * MB]
    taken = spares.take(3 * MB)
    assert taken is spare and spares.nbytes == 0
    other = spares.take(MB)  # a size with no spare: a new zeroed buffer
    assert other.numel() == MB and not other.any()


@pytest.mark.skipif(not hasattr(resource, "getrusage"), reason="page-fault counts need getrusage")
def test_a_spare_is_written_without_page_faults() -> None:
    spares = SpareBuffers()
    spares.take(8 * MB)
    spares.refill()
    taken = spares.take(8 * MB)
    before = minor_faults()
    taken.fill_(1)  # as the file's bytes are read into it
    assert minor_faults() - before < 64  # 2048 pages of 4 KiB, all there already


def test_spares_stay_within_max_bytes_least_recent_first() -> None:
    spares = SpareBuffers(max_bytes=5 * MB)
    for size in (2 * MB, 3 * MB, 1 * MB):
        spares.take(size)
    spares.refill()  # made 2, 3, then 1 MB, which passes the bound: the least recently taken (2 MB) goes
    assert set(spares._spares) == {3 * MB, 1 * MB}
    spares.take(8 * MB)
    spares.refill()  # larger than max_bytes: no spare
    assert spares.nbytes == 4 * MB
