"""End to end (issue 13, point 3): jobs with LoRAX's `merged_adapters` through real RabbitMQ and a
worker on the real engine (tiny random Llama, PEFT adapters written by the test). A merged job's
reply equals the engine's own run of the same decoded job; unmergeable or conflicting jobs are
answered `validation`, naming the field, and dead-lettered with that reason."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import Future

import pytest

from consumer import protocol
from consumer.jobs import to_request
from consumer.protocol import JSON, MSGPACK
from engine.engine import Engine
from engine.request import Completion, Outcome
from tests.amqp_helpers import worker_settings
from tests.builders import engine_with_adapters, running_worker

pytestmark = pytest.mark.slow

ADAPTERS = {  # name: (rank, alpha, targets)
    "a": (8, 16, ("q_proj", "v_proj")),
    "b": (8, 8, ("q_proj", "v_proj", "o_proj")),
    "c": (8, 32, ("v_proj", "gate_proj")),
    "r4": (4, 8, ("q_proj",)),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    adapters = {name: dict(r=rank, alpha=alpha, targets=targets, scale=0.25)
                for name, (rank, alpha, targets) in ADAPTERS.items()}
    with engine_with_adapters(tmp_path_factory.mktemp("merged_e2e"), adapters, max_batch=8,
                              adapter_slots=8) as engine:
        yield engine


@pytest.fixture
async def worker(engine, topology):
    async with running_worker(worker_settings(topology, max_batch=8, prefetch=16, batch_window_ms=20.0),
                              engine) as w:
        yield w


def direct(engine: Engine, body: bytes, content_type: str) -> Completion:
    """The job decoded as the worker decodes it, run on the engine alone."""
    job = protocol.decode_job(body, content_type, None, f"direct-{uuid.uuid4().hex}", None, None, None,
                              protocol.Limits())
    outcome: Future[Outcome] = Future()
    engine.submit(to_request(job, "local", time.time()), None, outcome.set_result)
    result = outcome.result(60)
    assert isinstance(result, Completion), result
    return result


def lorax_body(parameters: dict, content_type: str = JSON) -> bytes:
    """A LoRAX /generate payload as a LoRAX user sends it (no `v`)."""
    return protocol.encode({"inputs": "merge these adapters, please", "parameters": parameters}, content_type)


async def test_merged_adapter_jobs_on_the_wire(engine, worker, app):
    jobs = {
        "linear": (lorax_body({"merged_adapters": {"ids": ["a", "b", "c"], "weights": [0.6, 0.9, 0.5]},
                               "max_new_tokens": 10}), JSON),
        "ties": (lorax_body({"merged_adapters": {"ids": ["a", "b", "c"], "weights": [1.0, 0.7, 0.8],
                                                 "merge_strategy": "ties", "density": 0.5,
                                                 "majority_sign_method": "frequency"},
                             "max_new_tokens": 10}, MSGPACK), MSGPACK),
        "dare": (lorax_body({"merged_adapters": {"ids": ["c", "a"], "weights": [0.8, 1.1],
                                                 "merge_strategy": "dare_linear", "density": 0.6},
                             "max_new_tokens": 10, "details": True}), JSON),
        "alone": (lorax_body({"adapter_id": "a", "max_new_tokens": 10}), JSON),
    }
    expected = {name: direct(engine, body, ct) for name, (body, ct) in jobs.items()}
    assert len({r.text for r in expected.values()}) == len(jobs)  # each merge changes the output
    cids = {name: await app.publish_raw(body, ct) for name, (body, ct) in jobs.items()}
    for name, cid in cids.items():
        await app.wait(cid, timeout=60)
        kind, body = app.final(cid)
        assert kind == "result", body
        assert body["generated_text"] == expected[name].text, name
        assert body["details"]["generated_tokens"] == expected[name].generated_tokens
    assert app.replies[cids["linear"]][0].content_type == JSON
    # the engine built each merge once: the direct runs loaded them, the worker's jobs found them cached
    assert engine.stats()["adapters"]["loads"] == 4


async def test_unmergeable_and_conflicting_jobs_are_answered_and_dead_lettered(engine, worker, app):
    bad = {
        "conflict": (lorax_body({"adapter_id": "a", "merged_adapters": {"ids": ["a", "b"], "weights": [1, 1]}}),
                     "parameters.merged_adapters: at most one of adapter_id or merged_adapters"),
        "mismatch": (lorax_body({"merged_adapters": {"ids": ["a", "b"], "weights": [1]}}),
                     "parameters.merged_adapters.weights must have as many entries as ids"),
        "ranks": (lorax_body({"merged_adapters": {"ids": ["a", "r4"], "weights": [1, 1]}, "max_new_tokens": 4}),
                  "parameters.merged_adapters: cannot merge adapters of different ranks"),
        "missing": (lorax_body({"merged_adapters": {"ids": ["a", "nope"], "weights": [1, 1]},
                                "max_new_tokens": 4}),
                    "parameters.merged_adapters.ids[1] 'nope'"),
    }
    cids = {name: await app.publish_raw(body, JSON, correlation_id=f"{name}-{uuid.uuid4().hex[:6]}")
            for name, (body, _) in bad.items()}
    for name, cid in cids.items():
        await app.wait(cid, timeout=60)
        kind, reply = app.final(cid)
        assert kind == "error" and reply["retryable"] is False, reply
        assert reply["error_type"] == ("adapter_not_found" if name == "missing" else "validation"), reply
        assert bad[name][1] in reply["error"], reply
    dead = {m.correlation_id: m for m in await app.dead(len(bad))}
    for name, cid in cids.items():
        assert bad[name][1] in dead[cid].headers[protocol.HEADER_ERROR]
        assert json.loads(dead[cid].body) == json.loads(bad[name][0])  # the job as published
