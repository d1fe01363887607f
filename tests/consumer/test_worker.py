"""The worker against the real RabbitMQ at 127.0.0.1:5672 with a fake engine (tests/fake_engine.py).
Every test declares its own topology, so tests never see each other's jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import msgpack
import pytest

from consumer import protocol
from consumer.logging import configure_logging
from consumer.protocol import JSON, MSGPACK, Limits, Topology
from consumer.settings import WorkerSettings
from consumer.worker import Worker
from engine.config import EngineConfig
from engine.request import EngineError, ErrorType
from tests.amqp_helpers import (
    AMQP_URL,
    App,
    WorkerProcess,
    delete_topology,
    require_affinity,
    unique_topology,
    wait_for,
    worker_args,
    worker_settings,
)
from tests.fake_engine import FakeEngine, expected_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def make_worker(topology):
    """make_worker(engine, **settings) -> a started Worker; stopped and drained after the test."""
    started: list[tuple[Worker, asyncio.Task, FakeEngine]] = []

    async def make(engine: FakeEngine | None = None, **overrides) -> Worker:
        engine = engine or FakeEngine()
        worker = Worker(worker_settings(topology, **overrides), engine)
        task = asyncio.create_task(worker.run())
        started.append((worker, task, engine))
        await wait_for(lambda: worker.ready() or task.done(), 10, "worker start")
        if task.done():
            task.result()
        return worker

    yield make
    for worker, task, engine in started:
        worker.stop()
        await asyncio.wait_for(task, 15)
        engine.shutdown(2)


# ---- happy paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ct", [MSGPACK, JSON])
async def test_job_gets_result_in_its_content_type(make_worker, app, ct):
    await make_worker()
    cid = await app.publish(ct, inputs="hello", parameters={"adapter_id": "acme/bot",
                                                            "max_new_tokens": 64})
    await app.wait(cid)
    (reply,) = app.replies[cid]
    assert reply.content_type == ct and reply.type == "result" and reply.correlation_id == cid
    body = protocol.decode(reply.body, ct)
    assert protocol.decode_reply(reply.body, ct, reply.type).generated_text == body["generated_text"]
    assert body["v"] == 1 and body["id"] == cid and body["adapter_id"] == "acme/bot"
    assert body["generated_text"] == expected_text("hello", "acme/bot")
    assert body["details"]["finish_reason"] == "eos_token"
    assert body["details"]["generated_tokens"] == len(body["generated_text"])
    assert body["details"]["tokens"] == []  # listed only with details: true
    assert set(body["timings"]) == {"queue_ms", "adapter_load_ms", "ttft_ms", "total_ms"}


async def test_chat_details_full_text_and_stop(make_worker, app):
    engine = FakeEngine()
    await make_worker(engine)
    chat = await app.publish(messages=[{"role": "user", "content": "abc"}],
                             parameters={"details": True, "max_new_tokens": 4})
    full = await app.publish(inputs="xyz", parameters={"return_full_text": True})
    stop = await app.publish(inputs="12345", parameters={"stop": ["3"]})
    for cid in (chat, full, stop):
        await app.wait(cid)
    _, body = app.final(chat)
    assert body["generated_text"] == expected_text("abc", None, 4)
    assert body["details"]["finish_reason"] == "length"
    assert [t["text"] for t in body["details"]["tokens"]] == list(body["generated_text"])
    assert app.final(full)[1]["generated_text"] == "xyz" + expected_text("xyz")
    _, body = app.final(stop)
    assert body["generated_text"] == "<base>54" and body["details"]["finish_reason"] == "stop_sequence"


async def test_streaming_tokens_in_order_then_result(make_worker, app):
    await make_worker(FakeEngine(step_s=0.002))
    cids = [await app.publish(ct, inputs=f"stream {i}", stream=True)
            for i, ct in enumerate([MSGPACK, JSON, MSGPACK])]
    for i, cid in enumerate(cids):
        replies = await app.wait(cid)
        kinds = [m.type for m in replies]
        assert kinds[-1] == "result" and set(kinds[:-1]) == {"token"}
        tokens = [protocol.decode(m.body, m.content_type) for m in replies[:-1]]
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        result = protocol.decode(replies[-1].body, replies[-1].content_type)
        assert "".join(t["token"]["text"] for t in tokens) == result["generated_text"] \
            == expected_text(f"stream {i}")


async def test_no_reply_to_goes_to_results_exchange(make_worker, app, topology):
    await make_worker()
    queue = await app.channel.declare_queue("", exclusive=True)
    await queue.bind(topology.results_exchange, routing_key="result.#")
    got = []
    
    async def on_result(message):
        got.append(message)

    await queue.consume(on_result, no_ack=True)
    await app.publish(inputs="to exchange", parameters={"adapter_id": "acme/bot"}, reply_to=None,
                      correlation_id="noreply-1")
    await app.publish(inputs="base too", reply_to=None, correlation_id="noreply-2")
    await wait_for(lambda: len(got) == 2, 10, "results on the results exchange")
    by_cid = {m.correlation_id: m for m in got}
    assert by_cid["noreply-1"].routing_key == "result.acme/bot"
    assert by_cid["noreply-2"].routing_key == "result.base"
    body = msgpack.unpackb(by_cid["noreply-1"].body)
    assert body["generated_text"] == expected_text("to exchange", "acme/bot")


async def test_groups_are_batched_with_several_adapters(make_worker, app):
    engine = FakeEngine(step_s=0.01)
    worker = await make_worker(engine, batch_window_ms=50.0)
    adapters = [None, "a", "b", "c"]
    cids = [await app.publish(inputs=f"job {i}", parameters={"adapter_id": adapters[i % 4]})
            for i in range(12)]
    for i, cid in enumerate(cids):
        await app.wait(cid)
        assert app.final(cid)[1]["generated_text"] == expected_text(f"job {i}", adapters[i % 4])
    assert max(len(set(b)) for b in engine.batches) >= 2  # several adapters in one step
    assert max(len(b) for b in engine.batches) >= 4
    assert sorted(set(engine.prefetched)) == ["local:a", "local:b", "local:c"]
    assert sorted(engine.released_prefetches) == sorted(engine.prefetched)  # each lease, once
    metrics = worker.metrics.render().decode()
    assert "loraq_batch_size_count" in metrics and "loraq_batch_adapters_bucket" in metrics


# ---- bad input -----------------------------------------------------------------------------------

BAD_JOBS = [
    # (body bytes, content type, expected error_type)
    (b"\xc1\xc1", MSGPACK, "validation"),
    (b"{nope", JSON, "validation"),
    (msgpack.packb({"inputs": "x"}), "text/plain", "validation"),
    (msgpack.packb({"inputs": "x"}), None, "validation"),
    (msgpack.packb({"inputs": 42}), MSGPACK, "validation"),
    (msgpack.packb({"inputs": "x", "parameters": {"max_new_tokens": "ten"}}), MSGPACK, "validation"),
    (msgpack.packb({"inputs": "x", "messages": [{"role": "user", "content": "y"}]}), MSGPACK,
     "validation"),
    (msgpack.packb({"messages": [{"role": "robot", "content": "y"}]}), MSGPACK, "validation"),
    (msgpack.packb({"inputs": "x" * 5000}), MSGPACK, "validation"),  # body over max_body_bytes
    (msgpack.packb({"inputs": "x" * 600}), MSGPACK, "prompt_too_long"),
    (msgpack.packb({"inputs": "x", "parameters": {"adapter_id": "missing"}}), MSGPACK,
     "adapter_not_found"),
    (msgpack.packb({"inputs": "x", "parameters": {"adapter_id": "broken"}}), MSGPACK,
     "adapter_invalid"),
]


async def test_every_bad_input_is_answered_and_dead_lettered(make_worker, app):
    engine = FakeEngine(fail={
        "missing": EngineError(ErrorType.ADAPTER_NOT_FOUND, "no adapter 'missing'"),
        "broken": EngineError(ErrorType.ADAPTER_INVALID, "adapter_config.json: use_dora is set")})
    await make_worker(engine, max_body_bytes=4096, max_prompt_chars=500)
    cids = []
    for i, (body, ct, _) in enumerate(BAD_JOBS):
        cids.append(await app.publish_raw(body, ct, correlation_id=f"bad-{i}"))
    good = await app.publish(inputs="still alive")
    for cid, (_, _, error_type) in zip(cids, BAD_JOBS, strict=True):
        await app.wait(cid)
        kind, body = app.final(cid)
        assert kind == "error" and body["error_type"] == error_type, (cid, body)
        assert body["id"] == cid and body["error"] and body["retryable"] is False
    await app.wait(good)
    assert app.final(good)[1]["generated_text"] == expected_text("still alive")

    dead = await app.dead(len(BAD_JOBS))
    by_cid = {m.correlation_id: m for m in dead}
    for cid, (body, _, error_type) in zip(cids, BAD_JOBS, strict=True):
        m = by_cid[cid]
        assert m.headers[protocol.HEADER_ERROR_CODE] == error_type
        assert m.headers[protocol.HEADER_ERROR]
        assert m.body == body  # the job as published, for inspection / replay


async def test_bad_job_without_reply_to_is_dead_lettered(make_worker, app):
    await make_worker()
    await app.publish_raw(b"\xc1", MSGPACK, correlation_id="silent", reply_to=None)
    (m,) = await app.dead(1)
    assert m.correlation_id == "silent" and m.headers[protocol.HEADER_ERROR_CODE] == "validation"


# ---- reliability ---------------------------------------------------------------------------------

async def test_heartbeats_and_intake_survive_a_slow_engine_step(make_worker, app, topology):
    engine = FakeEngine(slow={"slow": 6.0})
    settings_url = AMQP_URL + ("&" if "?" in AMQP_URL else "?") + "heartbeat=1"
    worker = await make_worker(engine, amqp_url=settings_url)
    slow = await app.publish(inputs="s", parameters={"adapter_id": "slow", "max_new_tokens": 2})
    await wait_for(lambda: engine.stats()["running"] == 1, 5, "slow job running")
    t0 = time.monotonic()
    await asyncio.sleep(3.5)  # > 3 heartbeat intervals with the engine thread busy
    bad = await app.publish_raw(b"\xc1", MSGPACK)
    await app.wait(bad, timeout=2)  # answered while the step still runs
    assert time.monotonic() - t0 < 5.5
    good = await app.publish(inputs="queued behind")
    await wait_for(lambda: good in engine.submitted, 2, "good job taken in during the step")
    await app.wait(slow, timeout=10)
    await app.wait(good, timeout=10)
    assert app.final(good)[1]["generated_text"] == expected_text("queued behind")
    assert worker.ready()
    assert worker.metrics.reconnects._value.get() == 0  # the connection never dropped


async def test_redelivered_job_answered_from_cache(make_worker, app):
    engine = FakeEngine()
    await make_worker(engine)
    first = await app.publish(inputs="once", message_id="job-42", correlation_id="c-a")
    await app.wait(first)
    again = await app.publish(JSON, inputs="once", message_id="job-42", correlation_id="c-b")
    await app.wait(again)
    assert engine.submitted.count("job-42") == 1
    assert app.final(first)[1] == app.final(again)[1]  # same result, re-encoded as JSON
    assert app.replies[again][0].content_type == JSON


async def test_duplicate_while_running_joins_the_running_job(make_worker, app):
    engine = FakeEngine(slow={"slow": 1.0})
    await make_worker(engine)
    params = {"adapter_id": "slow", "max_new_tokens": 3}
    a = await app.publish(inputs="dup", parameters=params, message_id="dup-1", correlation_id="a")
    await wait_for(lambda: "dup-1" in engine.submitted, 5, "first submitted")
    b = await app.publish(inputs="dup", parameters=params, message_id="dup-1", correlation_id="b")
    await app.wait(a)
    await app.wait(b)
    assert engine.submitted.count("dup-1") == 1
    assert app.final(a)[1]["generated_text"] == app.final(b)[1]["generated_text"] == "<sl"


async def test_deadlines(make_worker, app):
    engine = FakeEngine(slow={"slow": 1.5})
    await make_worker(engine)
    past = await app.publish(inputs="late", headers={"x-deadline-ms": int(time.time() * 1000) - 1})
    await app.wait(past)
    assert app.final(past)[1]["error_type"] == "deadline_exceeded"
    assert past not in engine.submitted  # the model never saw it
    (dead,) = await app.dead(1)
    assert dead.headers[protocol.HEADER_ERROR_CODE] == "deadline_exceeded"

    # expires while waiting behind a slow step (AMQP expiration, seconds in aio-pika)
    await app.publish(inputs="s", parameters={"adapter_id": "slow", "max_new_tokens": 1})
    await wait_for(lambda: engine.stats()["running"] == 1, 5, "slow job running")
    waits = await app.publish(inputs="waits", parameters={"max_new_tokens": 1}, expiration=0.5)
    await app.wait(waits, timeout=5)
    assert app.final(waits)[1]["error_type"] == "deadline_exceeded"


async def test_retryable_failure_retried_then_dead_lettered_with_reason(make_worker, app, topology):
    engine = FakeEngine(fail={"flaky": EngineError(ErrorType.INTERNAL, "CUDA out of memory",
                                                   retryable=True)})
    await make_worker(engine, retry_delay_s=0.05)
    cid = await app.publish(inputs="x", parameters={"adapter_id": "flaky"}, message_id="poison")
    ok = await app.publish(inputs="fine")
    await app.wait(cid, timeout=15)
    kind, body = app.final(cid)
    assert kind == "error" and body["error_type"] == "internal" and "out of memory" in body["error"]
    # first delivery + delivery_limit (2) redeliveries, then the worker gave up
    assert engine.submitted.count("poison") == topology.delivery_limit + 1
    (dead,) = await app.dead(1)
    assert dead.message_id == "poison" and dead.headers[protocol.HEADER_ERROR_CODE] == "internal"
    assert "gave up after 3 deliveries" in dead.headers[protocol.HEADER_ERROR]
    await app.wait(ok)
    assert app.final(ok)[0] == "result"


async def test_retries_back_off_through_the_retry_queue(app):
    """A job that keeps failing retryably runs delivery_limit + 1 times, each retry after twice the
    delay of the one before (the retry queue's per-message TTL), and is dead-lettered with its
    reason; one that fails twice and then runs gets its result. The gaps are measured on the real
    broker (printed; asserted only as lower bounds: the broker never delivers a copy early)."""
    topology = unique_topology(delivery_limit=4)
    poison = EngineError(ErrorType.INTERNAL, "adapter store down", retryable=True)
    engine = FakeEngine(fail={"poison": poison, "flaky": poison}, fail_times={"flaky": 2})
    worker = Worker(worker_settings(topology, retry_delay_s=0.2, retry_max_delay_s=1.0), engine)
    await worker.start()
    try:
        a = await App(topology).open()
        try:
            bad = await a.publish(inputs="x", parameters={"adapter_id": "poison"}, message_id="poison")
            flaky = await a.publish(inputs="y", parameters={"adapter_id": "flaky"}, message_id="flaky")
            await a.wait(bad, timeout=20)
            await a.wait(flaky, timeout=20)
            kind, body = a.final(bad)
            assert kind == "error" and "adapter store down (gave up after 5 deliveries)" in body["error"]
            (dead,) = await a.dead(1)
            assert dead.message_id == "poison" and dead.headers[protocol.HEADER_ERROR_CODE] == "internal"
            assert a.final(flaky)[0] == "result"
            assert a.final(flaky)[1]["generated_text"] == expected_text("y", "flaky")
            assert await a.queue_depth(topology.retry_queue) == 0
        finally:
            await a.close()
    finally:
        await worker.drain()
        engine.shutdown(2)
        await delete_topology(topology)
    runs = [t for job, t in engine.submitted_at if job == "poison"]
    gaps = [round(b - a, 3) for a, b in zip(runs, runs[1:], strict=False)]
    print(f"\npoison job: {len(runs)} runs, gaps between runs (s) {gaps}; expected delays "
          f"{[worker.settings.backoff.delay_s(n) for n in range(1, 5)]}")
    assert len(runs) == topology.delivery_limit + 1
    for n, gap in enumerate(gaps, start=1):
        assert gap >= worker.settings.backoff.delay_s(n) - 0.02, gaps
    assert [job for job, _ in engine.submitted_at].count("flaky") == 3


async def test_a_retried_job_keeps_its_own_deadline(make_worker, app, topology):
    """The copy back from the retry queue carries the retry queue's death record, whose
    original-expiration is the retry delay: it must not become the job's deadline. Its real
    deadline (x-deadline-ms or its TTL) travels with it, and still holds."""
    flaky = EngineError(ErrorType.INTERNAL, "flaky", retryable=True)
    engine = FakeEngine(step_s=0.02, fail={"flaky": flaky, "late": flaky}, fail_times={"flaky": 1})
    await make_worker(engine, retry_delay_s=0.25)
    no_deadline = await app.publish(inputs="runs long after its retry " * 2,
                                    parameters={"adapter_id": "flaky", "max_new_tokens": 40})
    ttl = await app.publish(inputs="has a TTL", parameters={"adapter_id": "late"}, expiration=0.6)
    await app.wait(no_deadline, timeout=10)
    assert app.final(no_deadline)[0] == "result"  # ~0.8 s of steps after a 0.25 s retry delay
    assert [r.deadline for r in engine.requests if r.id == no_deadline] == [None, None]
    await app.wait(ttl, timeout=10)
    kind, body = app.final(ttl)
    assert kind == "error" and body["error_type"] == "deadline_exceeded"  # its TTL, across retries
    retried = [r for r in engine.requests if r.id == ttl]
    assert len(retried) >= 2 and len({r.deadline for r in retried}) == 1


async def test_deadline_passing_mid_generation_stops_the_row(make_worker, app):
    """A running job whose deadline passes is ended by the engine (its row freed) and answered
    with deadline_exceeded, dead-lettered; the tokens streamed before it stand."""
    engine = FakeEngine(step_s=0.05)
    await make_worker(engine)
    cid = await app.publish(inputs="a long answer " * 4, stream=True, parameters={"max_new_tokens": 60},
                            headers={"x-deadline-ms": int(time.time() * 1000) + 400})
    replies = await app.wait(cid, timeout=10)
    assert 1 <= sum(m.type == "token" for m in replies) < 60
    kind, body = app.final(cid)
    assert kind == "error" and body["error_type"] == "deadline_exceeded"
    (dead,) = await app.dead(1)
    assert dead.headers[protocol.HEADER_ERROR_CODE] == "deadline_exceeded"
    assert engine.stats()["running"] == 0


async def test_api_token_never_leaves_the_worker(make_worker, app, topology, restore_logging):
    """Not in logs, metrics, the result cache, error replies nor dead letters: an engine error
    that quotes the token is scrubbed, and the dead-letter copy is re-encoded without it (in its
    own content type); a body that cannot be decoded has no readable token and is kept as is."""
    token = "hf_SECRET_" + uuid.uuid4().hex
    engine = FakeEngine(fail={"private": EngineError(ErrorType.ADAPTER_NOT_FOUND,
                                                     f"401 Unauthorized for token {token}")})
    buffer = io.StringIO()
    configure_logging("debug", buffer)
    worker = await make_worker(engine)
    params = {"adapter_id": "private", "adapter_source": "local", "api_token": token}
    jobs = [await app.publish(ct, inputs="hi", parameters=params) for ct in (MSGPACK, JSON)]
    too_big = {**params, "max_new_tokens": 10**6}
    jobs.append(await app.publish_raw(msgpack.packb({"inputs": "x", "parameters": too_big}), MSGPACK))
    jobs.append(await app.publish_raw(json.dumps({"inputs": "x", "parameters": too_big}).encode(), JSON))
    garbled = b"\xc1" + token.encode()
    jobs.append(await app.publish_raw(garbled, MSGPACK))
    ok = await app.publish(inputs="fine", parameters={"api_token": token})
    for cid in [*jobs, ok]:
        await app.wait(cid)
    dead = {m.correlation_id: m for m in await app.dead(len(jobs))}
    metrics = worker.metrics.render().decode()
    assert app.final(ok)[0] == "result"
    for cid in jobs[:4]:
        kind, body = app.final(cid)
        assert kind == "error" and token not in json.dumps(body)
        m = dead[cid]
        assert token.encode() not in m.body and token not in str(m.headers)
        parsed = protocol.decode(m.body, m.content_type)
        assert parsed["inputs"] in ("hi", "x") and "api_token" not in parsed["parameters"]
        assert parsed["parameters"]["adapter_id"] == "private"
    assert "***" in app.final(jobs[0])[1]["error"]
    assert dead[jobs[4]].body == garbled  # undecodable: nothing to strip, kept for inspection
    cached = [worker.cache.get(c) for c in jobs[:2]]
    assert all(c is not None for c in cached) and token not in repr(cached)
    assert token not in metrics
    logs = buffer.getvalue()
    assert "job_failed" in logs and "401 Unauthorized for token ***" in logs
    assert token not in logs


async def test_drain_cancels_what_outlives_the_grace_period(app, topology):
    """A job still running when the grace period ends is cancelled on the engine and left
    unacked: it goes back to the queue for the next worker, unanswered."""
    engine = FakeEngine(slow={"slow": 3.0})
    worker = Worker(worker_settings(topology, shutdown_grace_s=0.2), engine)
    await worker.start()
    try:
        cid = await app.publish(inputs="s", parameters={"adapter_id": "slow", "max_new_tokens": 2})
        await wait_for(lambda: engine.stats()["running"] == 1, 5, "slow job running")
    finally:
        await worker.drain()
    assert engine.cancelled == [cid]
    assert cid not in app.replies  # returned to the queue (nack), not answered
    for _ in range(50):
        if await app.queue_depth(topology.queue) == 1:
            break
        await asyncio.sleep(0.05)
    assert await app.queue_depth(topology.queue) == 1
    engine.shutdown(2)


async def test_health_and_metrics_endpoints(make_worker, app):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = await make_worker(metrics_port=port, metrics_host="127.0.0.1")
    cid = await app.publish(inputs="observe me", parameters={"adapter_id": "a"})
    await app.wait(cid)

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()

    for path in ("/healthz", "/readyz", "/livez"):
        status, _ = await asyncio.to_thread(get, path)
        assert status == 200, path
    _, text = await asyncio.to_thread(get, "/metrics")
    for name in ("loraq_jobs_received_total", "loraq_ttft_seconds_bucket",
                 "loraq_queue_wait_seconds_bucket", "loraq_job_tokens_per_second_bucket",
                 "loraq_batch_size_bucket", 'loraq_adapter_cache_total{result="miss",tier="device"} 1.0',
                 "loraq_engine_steps", 'loraq_jobs_finished_total{outcome="result"}'):
        assert name in text, name
    rc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "consumer", "health",
                                                  "--port", str(port)], capture_output=True)
    assert rc.returncode == 0
    worker.stop()
    await wait_for(lambda: not worker.ready(), 5, "not ready after stop")


# ---- adapter affinity (the routing; tests/test_faults.py runs it with worker processes) ----------

async def test_affinity_jobs_reach_the_shared_queue_without_a_live_worker(app, topology):
    """--affinity: a job hashed to a worker that is gone (its queue still bound) is dead-lettered to
    the shared queue at once (TTL 0); with no worker queue bound at all the alternate exchange
    takes it there; a spilled job keeps its AMQP expiration (restored from x-death)."""
    await require_affinity()
    engine = FakeEngine()
    first = Worker(worker_settings(topology, affinity=True), engine)
    await first.start()
    own = topology.worker_queue(first.worker_id)
    warm = await app.publish(inputs="warm", parameters={"adapter_id": "a"})
    await app.wait(warm)
    assert first.metrics.jobs_routed.labels("affinity")._value.get() == 1
    await first.drain()
    assert await app.queue_depth(own) == 0  # still bound to the ring, nobody consuming

    spilled = [await app.publish(inputs="dead worker", parameters={"adapter_id": "a"}),
               await app.publish(inputs="no header (base)"),
               await app.publish(inputs="expiring", parameters={"adapter_id": "a"},
                                 expiration=0.3)]
    channel = await app.connection.channel()
    await channel.queue_delete(own)  # what x-expires does to a dead worker's queue
    await channel.close()
    spilled.append(await app.publish(inputs="empty ring", parameters={"adapter_id": "b"}))
    for _ in range(50):  # dead-lettering is asynchronous to the publish confirm
        if await app.queue_depth(topology.queue) == 4:
            break
        await asyncio.sleep(0.05)
    assert await app.queue_depth(topology.queue) == 4
    await asyncio.sleep(1.5)  # past the expiration (x-death times are whole seconds)

    second = Worker(worker_settings(topology, affinity=True), engine)
    await second.start()
    try:
        for cid in spilled:
            await app.wait(cid)
        assert [app.final(c)[0] for c in spilled] == ["result", "result", "error", "result"]
        assert app.final(spilled[2])[1]["error_type"] == "deadline_exceeded"
        assert app.final(spilled[0])[1]["generated_text"] == expected_text("dead worker", "a")
        assert second.metrics.jobs_routed.labels("shared")._value.get() == 4
        assert spilled[2] not in engine.submitted  # the model never saw the expired one
    finally:
        await second.drain()
        engine.shutdown(2)
        channel = await app.connection.channel()
        await channel.queue_delete(topology.worker_queue(second.worker_id))
        await channel.close()


async def test_affinity_without_the_broker_plugin_fails_clearly(topology, monkeypatch):
    import consumer.topology

    monkeypatch.setattr(consumer.topology, "AFFINITY_EXCHANGE_TYPE", "x-loraq-no-such-type")
    engine = FakeEngine()
    worker = Worker(worker_settings(topology, affinity=True), engine)
    with pytest.raises(consumer.topology.AffinityUnavailable, match="rabbitmq-plugins enable"):
        await worker.start()
    assert worker._connection.is_closed  # no robust reconnect loop left behind
    engine.shutdown(2)


def test_settings_flags_and_env_twins():
    env = {"LORAQ_AMQP_URL": "amqp://u:secret@h:5672/", "LORAQ_MAX_BATCH": "4",
           "LORAQ_PREFETCH": "8", "LORAQ_HUB_ENABLED": "true", "LORAQ_HUB_ALLOW_ORGS": "a, b",
           "LORAQ_BATCH_WINDOW_MS": "2.5", "LORAQ_MAX_MODEL_LEN": "", "LORAQ_QUEUE": "q"}
    s = WorkerSettings.from_args(["--max-batch", "6", "--adapter-root", "/ad", "--max-new-tokens", "9"],
                                 env=env)
    assert (s.max_batch, s.prefetch, s.batch_window_ms) == (6, 8, 2.5)
    assert (s.engine.hub_enabled, s.engine.hub_allow_orgs) == (True, ("a", "b"))
    assert s.engine.adapter_root == "/ad" and s.engine.max_model_len is None
    assert "secret" not in s.redacted_url() and "u:***@h" in s.redacted_url()
    assert s.topology == Topology(queue="q") and s.limits == Limits(max_new_tokens=9)
    with pytest.raises(ValueError):
        WorkerSettings(max_batch=64, prefetch=8)
    with pytest.raises(SystemExit):
        WorkerSettings.from_args([], env={"LORAQ_MAX_BATCH": "many"})
    with pytest.raises(TypeError, match="max_messages"):
        WorkerSettings.from_flags(max_messages=3)  # a limit, but no flag


def test_settings_groups_build_the_engine_config():
    s = WorkerSettings.from_flags(max_batch=16, prefetch=16, kv_cache_mb=64, adapter_host_mb=3,
                                  max_new_tokens=100, max_stop_length=7, adapter_slots=5)
    c = s.engine_config()
    assert (c.max_batch, c.adapter_slots, c.kv_cache_bytes, c.adapter_host_bytes) == \
        (16, 5, 64 * 2**20, 3 * 2**20)
    assert (c.max_new_tokens_limit, c.max_stop_sequences, c.max_stop_length) == (100, 8, 7)
    assert c.adapter_disk_dir == EngineConfig().adapter_disk_dir  # the engine's default
    assert WorkerSettings.from_flags(adapter_disk_dir="/d").engine_config().adapter_disk_dir == "/d"


def test_settings_to_args_rebuilds_them():
    s = WorkerSettings.from_flags(model="m", adapter_root="/a", max_batch=16, prefetch=64,
                                  batch_window_ms=2.5, hub_enabled=True, hub_allow_orgs=("x", "y"),
                                  metrics_port=1234, affinity=True, exchange="ex", max_body_bytes=99)
    args = s.to_args(skip=("metrics_port",))
    assert "--metrics-port" not in args and "--queue" not in args  # defaults are left out
    assert WorkerSettings.from_args(args, env={}) == dataclasses.replace(s, metrics_port=9090)
    assert WorkerSettings.from_args(WorkerSettings().to_args(), env={}) == WorkerSettings()


def test_consumer_package_imports_no_torch():
    code = ("import sys, consumer.service, consumer.protocol, consumer.settings; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---- graceful shutdown (a real worker process) ---------------------------------------------------

@pytest.mark.slow
async def test_sigterm_finishes_inflight_and_leaves_the_rest_queued(app, topology):
    proc = WorkerProcess(worker_args(topology, "--max-batch", "2", "--prefetch", "2",
                                     "--shutdown-grace-s", "10", "--fake-step-s", "0.05"))
    try:
        await proc.started()
        cids = [await app.publish(inputs=f"job {i:02d} " + "x" * 20, stream=True)
                for i in range(8)]  # ~34 tokens at 50 ms: ~1.7 s per job, 2 at a time
        await app.wait(cids[0], final=False)  # first tokens flowing: jobs in flight
        proc.signal(signal.SIGTERM)
        rc = await proc.wait(20)
        assert rc == 0, proc.output
        finished = [c for c in cids if any(m.type == "result" for m in app.replies.get(c, []))]
        assert 1 <= len(finished) <= 4, proc.output  # the in-flight ones, not the queued ones
        for cid in finished:
            assert app.final(cid)[0] == "result"
        assert await app.queue_depth(topology.queue) == len(cids) - len(finished)
        assert proc.events("worker_stopped"), proc.output
    finally:
        proc.kill()

    # a second worker answers the rest; nobody is answered twice
    engine = FakeEngine()
    worker = Worker(worker_settings(topology), engine)
    task = asyncio.create_task(worker.run())
    try:
        for cid in cids:
            await app.wait(cid)
            kind, body = app.final(cid)
            assert kind == "result"
    finally:
        worker.stop()
        await task
        engine.shutdown(2)
