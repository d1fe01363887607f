"""The adapter load queue: urgent jobs first, arrival order otherwise, a head the owner holds
back, one job per adapter, and loader threads that run torch single-threaded."""

from __future__ import annotations

import threading

import torch

from engine.load_queue import LoadJob, LoadQueue
from engine.request import AdapterRef


class Recorder:
    """A `run` that records the jobs it is given (and torch's threads on the loader thread), then
    blocks until `go` is set."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.threads: list[int] = []
        self.recorded = threading.Event()
        self.go = threading.Event()

    def __call__(self, job: LoadJob) -> None:
        self.started.append(job.ref.id)
        self.threads.append(torch.get_num_threads())
        self.recorded.set()
        self.go.wait(10)


def job(name: str, **kw) -> LoadJob:
    return LoadJob(AdapterRef(name), **kw)


def test_urgent_jobs_first_then_arrival_order():
    q = LoadQueue(Recorder(), workers=1)
    for name in "abc":
        q.add(job(name))
    q.add(job("demanded", demanded=True))
    q.add(job("recheck", revalidate=True))
    q.add_after_urgent(job("requeued", size_hint=10))
    q.demand(AdapterRef("c"))  # c is needed now: first, a full load
    order = list(q._waiting)
    assert order == ["local:c", "local:recheck", "local:demanded", "local:requeued", "local:a", "local:b"]
    assert q._waiting["local:c"].demanded and q.is_waiting("local:a") and not q.is_running("local:a")
    q.close()


def test_start_runs_in_order_and_the_owner_may_hold_the_head_back():
    run = Recorder()
    q = LoadQueue(run, workers=2)
    q.add(job("a"))
    q.add(job("b"))
    q.add(job("c"))
    q.start(lambda j: j.ref.id != "b")  # a starts, b is held back, c waits behind it
    assert q.is_running("local:a") and q.num_running == 1 and q.num_waiting == 2
    q.add(job("urgent", demanded=True))
    q.start(lambda j: False)  # urgent jobs are never held back
    assert q.is_running("local:urgent") and q.num_running == 2
    q.finish("local:a")
    q.start(lambda j: True)
    assert q.is_running("local:b") and q.num_waiting == 1  # one worker free: c still waits
    run.go.set()
    q.close()


def test_loader_threads_run_torch_single_threaded():
    """A loader thread that ran a parallel op would keep an OpenMP pool of its own (see README,
    "CPU threads"); the limit is the loader thread's own."""
    run = Recorder()
    run.go.set()
    q = LoadQueue(run, workers=1)
    threads = torch.get_num_threads()
    q.add(job("a"))
    q.start(lambda j: True)
    assert run.recorded.wait(10)
    assert run.threads == [1] and torch.get_num_threads() == threads
    q.close()


def test_nothing_starts_once_closed():
    run = Recorder()
    q = LoadQueue(run, workers=1)
    q.close()
    q.add(job("a"))
    q.start(lambda j: True)  # e.g. a prefetch lease released after the engine shut down
    assert run.started == [] and q.num_running == 0
