"""The step thread's heartbeat (`stats()["heartbeat_age_s"]`, what readiness reads): fresh while
the engine idles or works, growing while a step hangs, fresh again once it returns."""

from __future__ import annotations

import threading
import time

from engine.engine import IDLE_WAIT_S
from engine.request import Completion, GenerationRequest, SamplingParams
from tests.builders import run_requests


def age(engine) -> float:
    return engine.stats()["heartbeat_age_s"]


def wait_for(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_heartbeat_grows_while_a_step_hangs(make_engine, monkeypatch):
    engine = make_engine()
    time.sleep(3 * IDLE_WAIT_S)  # idle: the loop's timed wait keeps it fresh
    assert age(engine) < 3 * IDLE_WAIT_S
    release = threading.Event()
    run = engine.runner.run

    def hung(seqs, prefill):
        release.wait(30)
        return run(seqs, prefill)

    monkeypatch.setattr(engine.runner, "run", hung)
    done = threading.Thread(target=run_requests, args=(engine, [GenerationRequest(
        id="r", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=3))]))
    done.start()
    assert wait_for(lambda: age(engine) > 4 * IDLE_WAIT_S), "a hung step makes the heartbeat old"
    release.set()
    done.join(30)
    assert wait_for(lambda: age(engine) < 2 * IDLE_WAIT_S), "fresh again once the step returns"
    after = run_requests(engine, [GenerationRequest(id="r2", prompt_token_ids=[1, 2], params=SamplingParams(2))])
    assert isinstance(after["r2"], Completion)
