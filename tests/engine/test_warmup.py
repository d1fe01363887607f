"""`Engine.warmup`: throwaway steps with and without an adapter that leave the engine as they
found it (KV blocks, slots and their tensors, adapter tiers, counters) and change no later output."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from engine.request import AdapterRef, Completion, GenerationRequest, SamplingParams
from tests.builders import make_adapter, run_requests


@pytest.fixture
def adapter_root(tmp_path, loaded_models):
    make_adapter(loaded_models("llama").spec, tmp_path / "a", seed=21, targets=("q_proj", "v_proj", "down_proj"))
    return str(tmp_path)


def requests() -> list[GenerationRequest]:
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9, seed=3)
    return [GenerationRequest(id="base", prompt="Tell me", params=SamplingParams(max_new_tokens=8)),
            GenerationRequest(id="lora", prompt="Tell me", adapter=AdapterRef("a"),
                              params=SamplingParams(max_new_tokens=8)),
            GenerationRequest(id="lora-sampled", messages=[{"role": "user", "content": "Hi"}],
                              adapter=AdapterRef("a"), params=sampled)]


def texts(outcomes: dict) -> dict:
    assert all(isinstance(o, Completion) for o in outcomes.values()), outcomes
    return {rid: (o.token_ids, o.text) for rid, o in outcomes.items()}


def state(engine) -> dict:
    """stats() but the heartbeat, plus what the slots hold, once the step thread has retired the
    adapters of finished requests (its next scheduling round)."""
    deadline = time.monotonic() + 10
    while engine.stats()["active_adapters"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = {k: v for k, v in engine.stats().items() if k != "heartbeat_age_s"}
    return {**stats, "slot_ranks": list(engine.slots.ranks), "slot_modules": sorted(engine.slots.A)}


def test_warmup_leaves_the_engine_clean(make_engine, adapter_root):
    cold = texts(run_requests(make_engine(adapter_root=adapter_root, max_lora_rank=16), requests()))

    engine = make_engine(adapter_root=adapter_root, max_lora_rank=16)
    before = state(engine)
    with capture_logs() as logs:
        engine.warmup()
    assert state(engine) == before
    assert before["slot_modules"] == [] and before["kv_blocks_free"] == before["kv_blocks_total"]
    rounds = [e["adapter"] for e in logs if e["event"] == "engine_warmup_round"]
    assert rounds == [False, True] and logs[-1]["event"] == "engine_warmup_done"
    assert texts(run_requests(engine, requests())) == cold

    # again with an adapter resident (its modules allocated, its slot held): both untouched
    before = state(engine)
    assert before["slot_modules"] == ["down_proj", "q_proj", "v_proj"]
    engine.warmup()
    assert state(engine) == before
    assert texts(run_requests(engine, requests())) == cold


def test_warmup_after_shutdown_raises(make_engine):
    engine = make_engine()
    engine.shutdown(timeout=10)
    with pytest.raises(RuntimeError):
        engine.warmup()
