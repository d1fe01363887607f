"""Deadlines: a request whose deadline passes while it runs is failed at the next step with
deadline_exceeded and gives back its KV blocks and adapter pin, while the rows beside it go on
exactly; deadlines of waiting requests keep working."""

from __future__ import annotations

import time

import pytest

from engine.request import (
    AdapterRef,
    Completion,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from tests.builders import make_adapter, run_requests

CUT_AT = 4  # the late row's deadline passes as its token of this index is streamed


@pytest.fixture
def engine(tmp_path, make_engine, loaded_models):
    make_adapter(loaded_models("llama").spec, tmp_path / "a", seed=11)
    return make_engine(adapter_root=str(tmp_path), max_lora_rank=16)


def req(rid: str, prompt: list[int], new: int, adapter: str | None = None, deadline: float | None = None,
        **sampling) -> GenerationRequest:
    return GenerationRequest(id=rid, prompt_token_ids=prompt, adapter=AdapterRef(adapter) if adapter else None,
                             params=SamplingParams(max_new_tokens=new, ignore_eos=True, **sampling),
                             deadline=deadline)


def neighbours() -> list[GenerationRequest]:
    return [req("base", [5, 6, 7, 8], 24), req("lora", [9, 10, 11], 24, adapter="a"),
            req("seeded", [12, 13], 24, adapter="a", do_sample=True, temperature=0.8, seed=7)]


def test_deadline_passing_mid_generation_cancels_the_row(engine):
    alone = run_requests(engine, neighbours())
    total = engine.stats()["kv_blocks_total"]
    late = req("late", [1, 2, 3, 4, 5], 200, adapter="a", deadline=time.time() + 3600)
    streamed: dict[str, list[int]] = {}

    def on_token(event: TokenEvent) -> None:
        streamed.setdefault(event.request_id, []).append(event.index)
        if event.request_id == "late" and event.index == CUT_AT:
            late.deadline = time.time() - 1  # the client stops waiting now (on the engine thread)

    outcomes = run_requests(engine, [late, *neighbours()], on_token=on_token)
    failure = outcomes["late"]
    assert isinstance(failure, GenerationFailure)
    assert failure.error.type == ErrorType.DEADLINE_EXCEEDED and not failure.error.retryable
    assert streamed["late"] == list(range(CUT_AT + 1)), "stopped at the very next step"
    for rid, outcome in alone.items():
        assert isinstance(outcome, Completion) and isinstance(outcomes[rid], Completion)
        assert outcomes[rid].token_ids == outcome.token_ids, rid
    assert len(streamed["base"]) == 24  # the neighbours ran on after the late row left
    stats = engine.stats()
    assert stats["kv_blocks_free"] == total and stats["running"] == 0
    assert stats["adapters"]["device"]["pinned"] == 0


def test_deadlines_of_waiting_requests_still_work(make_engine):
    engine = make_engine(max_batch=1)  # the second request waits while the first runs
    expired = req("expired", [1, 2], 4, deadline=time.time() - 1)
    waiting = req("waiting", [3, 4], 4, deadline=time.time() + 3600)

    def on_token(event: TokenEvent) -> None:
        if event.request_id == "first" and event.index == 0:
            waiting.deadline = time.time() - 1

    outcomes = run_requests(engine, [req("first", [5, 6], 30), waiting, expired], on_token=on_token)
    assert isinstance(outcomes["first"], Completion)
    for rid in ("expired", "waiting"):
        outcome = outcomes[rid]
        assert isinstance(outcome, GenerationFailure) and outcome.error.type == ErrorType.DEADLINE_EXCEEDED, rid
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
