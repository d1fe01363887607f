"""Cancel messages (consumer.cancel, docs/protocol.md "Cancel") against the real RabbitMQ: a worker
on the fake engine stops a cancelled job wherever it is (collected, running, not arrived yet), each
job still gets exactly one final reply, and the Client cancels what it stops waiting for; one test
runs the real engine on a tiny model and checks that the cancelled row gave back its KV blocks."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from consumer import cancel, protocol
from consumer.cancel import RecentCancels
from consumer.client import Client, GenerationError, GenerationTimeout
from consumer.protocol import JSON, Limits, ProtocolError, Topology
from consumer.worker import CANCELLED, Worker
from tests.amqp_helpers import AMQP_URL, App, wait_for, worker_settings
from tests.fake_engine import FakeEngine, expected_text

# ---- the message and the worker's memory (no broker) ---------------------------------------------


def test_cancel_exchange_is_named_after_the_jobs_exchange():
    assert Topology().cancel_exchange == "loraq.cancel"
    assert Topology(exchange="jobs").cancel_exchange == "jobs.cancel"
    assert Topology(exchange="jobs", cancel_exchange="stop").cancel_exchange == "stop"
    t = Topology.prefixed("t1")
    assert t.cancel_exchange == "t1.loraq.cancel" and t.cancel_queue("w") == "t1.loraq.cancel.worker.w"


def test_cancel_message_round_trip_and_fallbacks():
    limits = Limits()
    for ct in (protocol.MSGPACK, JSON):
        assert protocol.decode_cancel(protocol.encode_cancel("job-1", ct), ct, None, limits) == "job-1"
    assert protocol.decode_cancel(b"", JSON, "job-2", limits) == "job-2"  # no body: its message_id
    assert protocol.decode_cancel(b'{"v": 1}', JSON, "job-3", limits) == "job-3"
    for body, message_id in ((b"", None), (b'{"id": 7}', None), (b"not json", ""),
                             (protocol.encode_cancel("x" * 300, JSON), None)):
        with pytest.raises(ProtocolError):
            protocol.decode_cancel(body, JSON, message_id, limits)


def test_recent_cancels_are_bounded_in_time_and_number():
    now = [0.0]
    recent = RecentCancels(remember_s=10.0, max_size=2, clock=lambda: now[0])
    recent.add("a")
    now[0] = 5.0
    recent.add("b")
    assert "a" in recent and "b" in recent and "c" not in recent
    now[0] = 8.0
    recent.add("c")  # over the size: the oldest goes
    assert "a" not in recent and len(recent) == 2
    now[0] = 14.0  # "b" was added at 5: forgotten after 15
    assert "b" in recent
    now[0] = 15.5
    assert "b" not in recent and "c" in recent
    recent.add("c")  # idempotent: one entry, its time renewed
    assert len(recent) == 1
    with pytest.raises(ValueError):
        RecentCancels(remember_s=0)


# ---- a worker on the fake engine -----------------------------------------------------------------

@pytest.fixture
async def cancel_topology(topology):
    """The throwaway topology, its cancel exchange deleted after the test too."""
    yield topology
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(topology.cancel_exchange)


@pytest.fixture
async def make_worker(cancel_topology):
    """make_worker(engine, **settings) -> a started Worker; drained and stopped after the test."""
    started: list[tuple[Worker, asyncio.Task]] = []

    async def make(engine, **overrides) -> Worker:
        worker = Worker(worker_settings(cancel_topology, **overrides), engine)
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        await wait_for(lambda: worker.ready() or task.done(), 10, "worker start")
        if task.done():
            task.result()
        return worker

    yield make
    for worker, task in started:
        worker.stop()
        await asyncio.wait_for(task, 15)
        worker.engine.shutdown(5)


async def send_cancel(app: App, job_id: str, content_type: str = protocol.MSGPACK) -> None:
    assert await cancel.publish(app.connection, app.topology, job_id, content_type)


async def assert_cancelled(app: App, cid: str, job_id: str, timeout: float = 10.0) -> list:
    """The job's replies: exactly one final, the cancel's deadline_exceeded, and its dead letter."""
    replies = await app.wait(cid, timeout=timeout)
    kind, body = app.final(cid)
    assert (kind, body["error_type"], body["error"]) == ("error", "deadline_exceeded", CANCELLED)
    (dead,) = await app.dead(1)
    assert dead.message_id == job_id
    assert dead.headers[protocol.HEADER_ERROR_CODE] == "deadline_exceeded"
    assert dead.headers[protocol.HEADER_ERROR] == CANCELLED
    return replies


async def test_cancel_of_a_running_job_stops_it_and_frees_its_row(make_worker, app):
    engine = FakeEngine(step_s=0.05, max_batch=1)  # one row: the next job runs only once it is free
    await make_worker(engine)
    cid = await app.publish(inputs="a long answer " * 5, stream=True, message_id="run-1",
                            parameters={"max_new_tokens": 60})
    await app.wait(cid, final=False)  # a token: it is running
    await send_cancel(app, "run-1", JSON)
    await send_cancel(app, "run-1")  # cancels are idempotent
    replies = await assert_cancelled(app, cid, "run-1")
    assert 1 <= sum(m.type == "token" for m in replies) < 60
    assert "run-1" in engine.cancelled and engine.stats()["running"] == 0
    after = await app.publish(inputs="next")
    await app.wait(after)
    assert app.final(after)[1]["generated_text"] == expected_text("next")
    again = await app.publish(inputs="a long answer " * 5, message_id="run-1")  # a redelivery
    await app.wait(again)
    assert app.final(again)[1]["error"] == CANCELLED and engine.submitted.count("run-1") == 1


async def test_cancel_of_a_collected_job_drops_it_before_the_engine(make_worker, app):
    engine = FakeEngine(slow={"slow": 1.0})
    await make_worker(engine, batch_window_ms=1500.0)  # the busy engine makes the next job wait
    busy = await app.publish(inputs="busy", parameters={"adapter_id": "slow", "max_new_tokens": 2})
    await wait_for(lambda: engine.stats()["running"] == 1, 5, "the slow job running")
    cid = await app.publish(inputs="collected", message_id="col-1")
    await asyncio.sleep(0.2)  # taken and collected (the window is 1.5 s)
    await send_cancel(app, "col-1")
    await assert_cancelled(app, cid, "col-1")
    assert "col-1" not in engine.submitted and "col-1" not in engine.cancelled
    await app.wait(busy)
    assert app.final(busy)[0] == "result"


async def test_a_cancel_that_overtakes_its_job_refuses_it(make_worker, app):
    engine = FakeEngine()
    await make_worker(engine)
    await send_cancel(app, "early-1")
    await asyncio.sleep(0.2)  # the worker has it before the job is even published
    cid = await app.publish(inputs="too late", message_id="early-1")
    await assert_cancelled(app, cid, "early-1")
    assert "early-1" not in engine.submitted  # never run


async def test_cancel_of_an_unknown_job_or_a_bad_cancel_is_harmless(make_worker, app):
    engine = FakeEngine()
    worker = await make_worker(engine)
    await send_cancel(app, "nobody-has-this")
    exchange = await app.channel.get_exchange(app.topology.cancel_exchange, ensure=False)
    await exchange.publish(aio_pika.Message(b"\xc1garbage", content_type=protocol.MSGPACK), "")
    cid = await app.publish(inputs="still fine")
    await app.wait(cid)
    assert app.final(cid)[1]["generated_text"] == expected_text("still fine")
    assert worker.ready() and engine.cancelled == []
    finished = await app.publish(inputs="done once", message_id="done-1")
    await app.wait(finished)
    await send_cancel(app, "done-1")  # after its answer: nothing to stop, nothing answered again
    redelivered = await app.publish(inputs="done once", message_id="done-1")
    await app.wait(redelivered)
    assert app.final(redelivered)[0] == "result"  # its cached result, not the cancel
    assert len(app.replies[finished]) == 1


async def test_client_cancels_what_it_stops_waiting_for(make_worker, app):
    engine = FakeEngine(slow={"slow": 3.0})
    await make_worker(engine)
    slow = {"adapter_id": "slow", "max_new_tokens": 4}
    async with Client(AMQP_URL, topology=app.topology) as client:
        # a timeout (the deadline is far: only the cancel can stop the job before it runs for 3 s)
        with pytest.raises(GenerationTimeout):
            await client.generate("wait", job_id="timed-out", timeout=0.5, deadline=60, **slow)
        await wait_for(lambda: "timed-out" in engine.cancelled, 5, "the timed-out job cancelled")
        # the awaiting task cancelled
        task = asyncio.create_task(client.generate("wait", job_id="task-cancelled", deadline=60, **slow))
        await wait_for(lambda: "task-cancelled" in engine.submitted, 5, "the job submitted")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: "task-cancelled" in engine.cancelled, 5, "the abandoned job cancelled")
        # Client.cancel, while another call waits for the job
        job_id = f"explicit-{uuid.uuid4().hex[:6]}"
        waiting = asyncio.create_task(client.generate("wait", job_id=job_id, deadline=60, **slow))
        await wait_for(lambda: job_id in engine.submitted, 5, "the job submitted")
        assert await client.cancel(job_id)
        with pytest.raises(GenerationError) as e:
            await waiting
        assert (e.value.error_type, e.value.message) == ("deadline_exceeded", CANCELLED)
        # a call answered in full cancels nothing
        assert (await client.generate("quick", job_id="answered")).generated_text == expected_text("quick")
    assert "answered" not in engine.cancelled
    dead = await app.dead(3)
    assert {d.message_id for d in dead} == {"timed-out", "task-cancelled", job_id}


# ---- the real engine -----------------------------------------------------------------------------

async def test_cancelled_running_request_frees_its_kv_blocks(make_worker, app, tiny_model_dirs, loaded_models):
    from engine.config import EngineConfig
    from engine.engine import Engine

    engine = Engine(EngineConfig(model=str(tiny_model_dirs["llama"])), model=loaded_models("llama"))
    await make_worker(engine)
    total = engine.stats()["kv_blocks_total"]
    cid = await app.publish(inputs="Tell me a long story about ships.", stream=True, message_id="real-1",
                            parameters={"max_new_tokens": 400, "ignore_eos_token": True})
    await app.wait(cid, timeout=60, final=False)  # generating
    assert engine.stats()["kv_blocks_free"] < total
    await send_cancel(app, "real-1")
    replies = await assert_cancelled(app, cid, "real-1", timeout=30)
    assert sum(m.type == "token" for m in replies) < 400
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_free"] == total
