"""Structured output end to end (issue 13, point 2): real RabbitMQ, a worker in this process on the
real engine with a tiny random Llama and two adapters. Constrained jobs in LoRAX's, OpenAI's and
loraq's shapes share bursts with free jobs on several adapters; every constrained reply parses and
validates against its schema (the random weights notwithstanding); a schema that cannot be
enforced, or a malformed response_format, is an error reply and a dead letter."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from concurrent.futures import Future

import jsonschema
import pytest

from consumer import protocol
from consumer.jobs import to_request
from consumer.protocol import JSON
from engine.engine import Engine
from engine.request import Completion, Outcome
from tests.amqp_helpers import worker_settings
from tests.builders import engine_with_adapters, running_worker

pytestmark = pytest.mark.slow

CHARACTER = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "armor"],
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 1, "maximum": 99},
                   "armor": {"enum": ["leather", "chainmail", "plate"]}},
}
VERDICT = {"type": "object", "additionalProperties": False, "required": ["label", "confidence"],
           "properties": {"label": {"enum": ["spam", "ham"]},
                          "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}}
ADAPTERS = (None, "tenant-a", "tenant-b")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    adapters: dict[str, dict] = {"tenant-a": dict(r=4),
                                 "tenant-b": dict(r=8, targets=("q_proj", "v_proj", "down_proj"))}
    with engine_with_adapters(tmp_path_factory.mktemp("structured-e2e"), adapters, max_batch=16) as engine:
        yield engine


@pytest.fixture
async def worker(engine, topology):
    async with running_worker(worker_settings(topology, max_batch=16, prefetch=32, batch_window_ms=20.0),
                              engine) as w:
        yield w


def constrained_jobs() -> list[tuple[dict, dict | str]]:
    """(job parameters, the schema or regex its text must satisfy), on every adapter in turn."""
    shapes: list[tuple[dict, dict | str]] = [
        ({"type": "json_object", "schema": CHARACTER}, CHARACTER),  # LoRAX's shape
        ({"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}, VERDICT),  # OpenAI's
        ({"type": "regex", "pattern": "(spam|ham)"}, "(spam|ham)"),  # loraq's
    ]
    jobs = []
    for k in range(9):
        fmt, check = shapes[k % 3]
        sampled = {"do_sample": True, "temperature": 1.2, "seed": k} if k % 2 else {}
        jobs.append(({"adapter_id": ADAPTERS[k % 3], "max_new_tokens": 120, "response_format": fmt, **sampled},
                     check))
    return jobs


def direct(engine: Engine, parameters: dict) -> Completion:
    """A free job decoded as the worker decodes it, run on the engine alone."""
    body = protocol.encode_job(inputs="free text please", parameters=parameters)
    job = protocol.decode_job(body, protocol.MSGPACK, None, f"direct-{uuid.uuid4().hex}", None, None, None,
                              protocol.Limits())
    outcome: Future[Outcome] = Future()
    engine.submit(to_request(job, "local", time.time()), None, outcome.set_result)
    result = outcome.result(60)
    assert isinstance(result, Completion), result
    return result


async def test_constrained_and_free_jobs_share_bursts_and_every_text_validates(engine, worker, app):
    jobs = constrained_jobs()
    free = [{"adapter_id": a, "max_new_tokens": 20} for a in ADAPTERS]
    expected_free = [direct(engine, p) for p in free]

    cids = await asyncio.gather(
        *(app.publish(JSON, inputs=f"classify job {k}", parameters=p) for k, (p, _) in enumerate(jobs)),
        *(app.publish(inputs="free text please", parameters=p) for p in free))
    for cid in cids:
        await app.wait(cid, timeout=120)

    for cid, (parameters, check) in zip(cids, jobs, strict=False):
        kind, body = app.final(cid)
        assert kind == "result", body
        text = body["generated_text"]
        assert body["details"]["finish_reason"] == "eos_token", body
        assert body["adapter_id"] == parameters["adapter_id"]
        if isinstance(check, str):
            assert re.fullmatch(check, text), text
        else:
            jsonschema.validate(json.loads(text), check)
    for cid, result in zip(cids[len(jobs):], expected_free, strict=True):  # untouched by the constrained rows
        kind, body = app.final(cid)
        assert kind == "result" and body["generated_text"] == result.text, body


async def test_a_lorax_body_without_v_is_constrained_too(worker, app):
    body = {"inputs": "who goes there?", "parameters": {"adapter_id": "tenant-b", "max_new_tokens": 100,
                                                         "response_format": {"type": "json_object",
                                                                             "schema": CHARACTER}}}
    cid = await app.publish_raw(json.dumps(body).encode(), JSON)
    await app.wait(cid, timeout=60)
    kind, reply = app.final(cid)
    assert kind == "result", reply
    jsonschema.validate(json.loads(reply["generated_text"]), CHARACTER)


async def test_too_few_tokens_finish_with_length(worker, app):
    cid = await app.publish(inputs="short", parameters={"max_new_tokens": 4, "response_format": {
        "type": "json_object", "schema": CHARACTER}})
    await app.wait(cid, timeout=60)
    kind, body = app.final(cid)
    assert kind == "result" and body["details"]["finish_reason"] == "length"
    assert body["generated_text"] == '{"na'


async def test_formats_that_cannot_be_enforced_are_answered_and_dead_lettered(worker, app):
    bad = {
        "unknown-type": ({"type": "json_object", "schema": {"type": "strng"}}, "Invalid type: strng"),
        "unenforceable": ({"type": "json_object", "schema": {"not": {"type": "null"}}}, "not"),
        "bad-regex": ({"type": "regex", "pattern": "(open"}, "unclosed"),
        "wire-type": ({"type": "yaml"}, "parameters.response_format.type"),
    }
    for cid, (fmt, _) in bad.items():  # raw: the client library would refuse the last one itself
        body = {"v": 1, "inputs": "x", "parameters": {"response_format": fmt}}
        await app.publish_raw(json.dumps(body).encode(), JSON, correlation_id=cid)
    good = await app.publish(inputs="y", parameters={"max_new_tokens": 10,
                                                     "response_format": {"type": "regex", "pattern": "(yes|no)"}})
    for cid in [*bad, good]:
        await app.wait(cid, timeout=60)

    for cid, (_, message) in bad.items():
        kind, body = app.final(cid)
        assert kind == "error" and body["error_type"] == "validation" and not body["retryable"], body
        assert message in body["error"] and "response_format" in body["error"], body
    dead = {m.correlation_id: m for m in await app.dead(len(bad))}
    assert set(dead) == set(bad)
    assert all(m.headers[protocol.HEADER_ERROR_CODE] == "validation" for m in dead.values())
    assert app.final(good)[1]["generated_text"] in ("yes", "no")
