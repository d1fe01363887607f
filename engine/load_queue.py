"""The adapter load queue: loads waiting in order, and the few loader threads that run them.

Order: loads `acquire` demanded and re-checks of resident adapters' files go first; the rest wait
in arrival order (FIFO), and the owner may hold the head back (`start`'s predicate) while starting
it would overflow its budget. At most one load per adapter is waiting or running at a time."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from engine.request import AdapterRef

LOAD_WORKERS = 2


@dataclass
class LoadJob:
    ref: AdapterRef
    demanded: bool = False  # `acquire` needs it now: runs first, never held back
    revalidate: bool = False  # resident: re-check its files, reload only if they changed
    size_hint: int | None = None  # its host bytes when known (loaded before, evicted, queued again)

    @property
    def urgent(self) -> bool:
        return self.demanded or self.revalidate


def _single_threaded_torch() -> None:
    """Loader threads run torch ops on themselves alone, so they start no OpenMP pool of their own
    (see README, "CPU threads"). The limit holds for the calling thread only."""
    import torch

    torch.get_num_threads()  # torch's once-per-thread init first: it would reset the limit later
    threadpool_limits(1, user_api="openmp")


class LoadQueue:
    """Not thread-safe: the owner calls every method under its lock. `run(job)` is called on a
    loader thread; it must end with `finish(job.ref.key)` (under the owner's lock)."""

    def __init__(self, run: Callable[[LoadJob], None], workers: int = LOAD_WORKERS) -> None:
        self._run = run
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="adapter-load",
                                        initializer=_single_threaded_torch)
        self._waiting: OrderedDict[str, LoadJob] = OrderedDict()  # AdapterRef.key -> job, next first
        self._running: set[str] = set()
        self._closed = False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def is_waiting(self, key: str) -> bool:
        return key in self._waiting

    def is_running(self, key: str) -> bool:
        return key in self._running

    def add(self, job: LoadJob) -> None:
        """Queue `job` (its adapter has none queued or running): urgent jobs first, others last."""
        key = job.ref.key
        self._waiting[key] = job
        if job.urgent:
            self._waiting.move_to_end(key, last=False)

    def add_after_urgent(self, job: LoadJob) -> None:
        """Queue `job` ahead of every non-urgent job (it arrived before them), behind urgent ones."""
        urgent = []
        for key, queued in self._waiting.items():
            if not queued.urgent:
                break
            urgent.append(key)
        self._waiting[job.ref.key] = job
        for key in (job.ref.key, *reversed(urgent)):
            self._waiting.move_to_end(key, last=False)

    def demand(self, ref: AdapterRef) -> None:
        """The waiting load of `ref` is needed now: a full load (no longer a mere re-check), first."""
        job = self._waiting[ref.key]
        job.ref, job.demanded, job.revalidate = ref, True, False
        self._waiting.move_to_end(ref.key, last=False)

    def start(self, may_start: Callable[[LoadJob], bool]) -> None:
        """Hand waiting jobs to free loader threads, in order; stops at a non-urgent head job
        that `may_start` refuses (it stays first). Nothing starts once closed."""
        while self._waiting and len(self._running) < self._workers and not self._closed:
            key, job = next(iter(self._waiting.items()))
            if not job.urgent and not may_start(job):
                return
            del self._waiting[key]
            self._running.add(key)
            self._pool.submit(self._run, job)

    def finish(self, key: str) -> None:
        """The running load of `key` has ended (called by `run`)."""
        self._running.discard(key)

    def close(self) -> None:
        """Cancel the jobs not yet started; running ones end on their own."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
