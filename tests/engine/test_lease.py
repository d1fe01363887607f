"""A lease gives its hold back exactly once, whichever thread releases it and however often."""

from __future__ import annotations

import threading

from engine.lease import Lease


def test_release_runs_once():
    calls = []
    lease = Lease(lambda: calls.append(1))
    assert not lease.released
    lease.release()
    lease.release()
    assert calls == [1] and lease.released


def test_racing_releases_run_once():
    calls = []
    lease = Lease(lambda: calls.append(1))
    start = threading.Barrier(8)

    def release() -> None:
        start.wait()
        lease.release()

    threads = [threading.Thread(target=release) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
