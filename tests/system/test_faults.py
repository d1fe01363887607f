"""Fault injection (issue 5), judged from the client's side like Jepsen's RabbitMQ checker: every
job published is answered exactly once as a client sees it (duplicate replies for one correlation id
are dropped by the client, and counted here), or dead-lettered with the right reason; none lost.

Real RabbitMQ, real worker processes (tests/worker_script.py: the worker on the fake engine, so the
faults, not the model, are under test), each case bounded to a few seconds. The table of cases is
printed at the end of the module and written to $LORAQ_FAULT_TABLE when set.

The broker restart case (`-m broker_restart`) really restarts the RabbitMQ application on this
host (`rabbitmqctl stop_app` / `start_app`): every other client of that broker loses its connection,
so never run it while anything else uses the broker (or point the suite at a private node:
LORAQ_TEST_AMQP_URL for the AMQP URL, RABBITMQ_NODENAME for rabbitmqctl). The connection-drop case
covers the worker's side of it without a restart (`rabbitmqctl close_connection`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import msgpack
import pytest

from consumer import protocol
from consumer.protocol import JSON, MSGPACK
from tests.amqp_helpers import (
    AMQP_URL,
    App,
    WorkerProcess,
    broker_connection_of,
    delete_topology,
    require_affinity,
    unique_topology,
    wait_for,
    with_query,
    worker_args,
)

pytestmark = pytest.mark.slow

ROWS: list[Row] = []


@dataclass
class Row:
    case: str
    sent: int
    answered: int
    dead_lettered: int
    duplicated: int
    lost: int
    unexpected: int


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if not ROWS:
        return
    lines = ["| case | jobs sent | answered | dead-lettered (with reason) | duplicate replies "
             "(dropped by the client) | lost | unexpected |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.case} | {r.sent} | {r.answered} | {r.dead_lettered} | {r.duplicated} | "
              f"{r.lost} | {r.unexpected} |" for r in ROWS]
    table = "\n".join(lines)
    print("\n" + table)
    if path := os.environ.get("LORAQ_FAULT_TABLE"):
        with open(path, "w") as f:
            f.write(table + "\n")


@pytest.fixture
async def affinity():
    await require_affinity()


@pytest.fixture
def workers():
    """workers(topology, *flags) -> a started WorkerProcess; all killed after the test."""
    started: list[WorkerProcess] = []

    async def start(topology, *flags: str) -> WorkerProcess:
        proc = WorkerProcess(worker_args(topology, *flags))
        started.append(proc)
        await proc.started()
        return proc

    yield start
    for proc in started:
        proc.kill()


class Ledger:
    """What the client expects of each job: ("result", None) or ("error", error_type)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.expected: dict[str, tuple[str, str | None]] = {}

    async def job(self, expect: str = "result", error_type: str | None = None,
                  ct: str = MSGPACK, **kw) -> str:
        cid = await self.app.publish(ct, **kw)
        self.expected[cid] = (expect, error_type)
        return cid

    async def raw(self, body: bytes, content_type: str | None, error_type: str, **kw) -> str:
        cid = await self.app.publish_raw(body, content_type, **kw)
        self.expected[cid] = ("error", error_type)
        return cid

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until every job has a final reply (AssertionError after `timeout`)."""
        await wait_for(lambda: all(self._finals(c) for c in self.expected), timeout,
                       "every job answered")
        await asyncio.sleep(0.3)  # let late duplicates arrive, so they are counted

    def _finals(self, cid: str) -> list:
        return [m for m in self.app.replies.get(cid, []) if m.type != protocol.REPLY_TOKEN]

    async def check(self, case: str, *, duplicates_allowed: bool = False) -> Row:
        dead = []
        queue = await self.app.channel.get_queue(self.app.topology.dead_queue, ensure=False)
        while (m := await queue.get(no_ack=True, fail=False)) is not None:
            dead.append(m)
        dead_codes = {m.correlation_id: m.headers.get(protocol.HEADER_ERROR_CODE) for m in dead}
        answered = duplicated = lost = unexpected = dead_ok = 0
        for cid, (kind, error_type) in self.expected.items():
            finals = self._finals(cid)
            if not finals:
                lost += 1
                continue
            duplicated += len(finals) - 1
            got = {(m.type, protocol.decode(m.body, m.content_type).get("error_type"))
                   for m in finals}
            if got != {(kind, error_type)}:
                unexpected += 1
            elif kind == "error":
                if dead_codes.get(cid) == error_type:
                    dead_ok += 1
                else:
                    unexpected += 1
            answered += 1
        unexpected += len(set(self.app.replies) - set(self.expected))
        unexpected += len(set(dead_codes) - {c for c, (k, _) in self.expected.items()
                                             if k == "error"})
        row = Row(case, len(self.expected), answered, dead_ok, duplicated, lost, unexpected)
        ROWS.append(row)
        assert lost == 0 and unexpected == 0, row
        if not duplicates_allowed:
            assert duplicated == 0, row
        return row


def close_amqp_connection(erlang_pid: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "close_connection", erlang_pid, "fault test"],
                   check=True, capture_output=True)


def prompt(i: int) -> str:
    return f"fault job {i:03d} " + "y" * 12


# ---- cases ---------------------------------------------------------------------------------------

async def test_kill9_mid_batch_while_a_second_worker_runs(topology, app, workers):
    flags = ("--max-batch", "4", "--prefetch", "4", "--fake-step-s", "0.02")
    a = await workers(topology, *flags)
    await workers(topology, *flags)
    ledger = Ledger(app)
    cids = [await ledger.job(inputs=prompt(i)) for i in range(30)]
    await app.wait(cids[0])
    a.proc.send_signal(signal.SIGKILL)
    await ledger.settle()
    await ledger.check("kill -9 a worker mid-batch (second worker running)",
                       duplicates_allowed=True)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
@pytest.mark.parametrize("affinity_mode", [False, True], ids=["shared", "affinity"])
async def test_connection_drop_mid_batch(topology, app, workers, affinity_mode):
    if affinity_mode:
        await require_affinity()
    w = await workers(topology, "--max-batch", "4", "--prefetch", "8", "--fake-step-s", "0.03",
                      "--amqp-url", with_query(AMQP_URL, reconnect_interval=0.5),
                      *(["--affinity", "--log-level", "debug"] if affinity_mode else []))
    connection = await asyncio.to_thread(broker_connection_of, w.proc.pid, "worker")
    ledger = Ledger(app)
    cids = [await ledger.job(inputs=prompt(i), stream=i % 2 == 0,
                             parameters={"adapter_id": f"tenant-{i % 3}"}) for i in range(24)]
    await app.wait(cids[0])  # ~1 s into ~6 s of work
    await asyncio.to_thread(close_amqp_connection, connection)
    await ledger.settle()
    assert w.proc.poll() is None and w.events("amqp_reconnected"), w.output
    # the drop hit jobs in flight: their redeliveries joined the running job or hit the cache
    assert w.events("job_joined_inflight") or w.events("job_answered_from_cache"), w.output
    if affinity_mode:  # the ring still leads to this worker's (redeclared, rebound) queue
        for i in range(24, 27):
            await ledger.job(inputs=prompt(i), parameters={"adapter_id": "after-reconnect"})
        await ledger.settle()
        late = [e["route"] for e in w.events("job_received")
                if e.get("adapter_id") == "after-reconnect"]
        assert late == ["affinity"] * 3, w.output
    await ledger.check("AMQP connection dropped mid-batch (worker reconnects"
                       + (", --affinity: its queue and bindings restored)" if affinity_mode else ")"),
                       duplicates_allowed=True)


async def test_sigterm_mid_batch(topology, app, workers):
    a = await workers(topology, "--max-batch", "4", "--prefetch", "4", "--fake-step-s", "0.03",
                      "--shutdown-grace-s", "10")
    ledger = Ledger(app)
    cids = [await ledger.job(inputs=prompt(i)) for i in range(16)]
    await app.wait(cids[0])
    a.signal(signal.SIGTERM)
    assert await a.wait(20) == 0, a.output
    await workers(topology, "--max-batch", "4", "--prefetch", "4")
    await ledger.settle()
    await ledger.check("SIGTERM mid-batch, then a new worker")


async def test_bad_jobs_mixed_with_good(topology, app, workers):
    await workers(topology, "--max-body-bytes", "2048", "--max-new-tokens", "100")
    ledger = Ledger(app)
    for i in range(20):
        await ledger.job(ct=(MSGPACK, JSON)[i % 2], inputs=prompt(i))
        kind = i % 5
        if kind == 0:
            await ledger.raw(b"\x93\x01", MSGPACK, "validation")  # malformed (truncated array)
        elif kind == 1:
            await ledger.raw(msgpack.packb({"inputs": "z" * 4096}), MSGPACK, "validation")
        elif kind == 2:
            await ledger.raw(json.dumps({"inputs": ["not", "text"]}).encode(), JSON, "validation")
        elif kind == 3:
            await ledger.raw(b"<job/>", "application/xml", "validation")
        else:
            await ledger.raw(msgpack.packb({"inputs": "x", "parameters": {"max_new_tokens": 101}}),
                             MSGPACK, "validation")
    await ledger.settle()
    await ledger.check("malformed / oversized / wrong-typed / wrong content-type mixed with good")


async def test_reply_queue_deleted_before_the_reply(topology, app, workers):
    w = await workers(topology, "--fake-slow", "slow=1.0")
    gone = await app.channel.declare_queue("", exclusive=True)
    await app.publish(inputs="orphan", parameters={"adapter_id": "slow"}, reply_to=gone.name,
                      correlation_id="orphan")
    await asyncio.sleep(0.3)
    await gone.delete(if_unused=False, if_empty=False)
    ledger = Ledger(app)
    await ledger.job(inputs="next one")
    await ledger.settle()
    await wait_for(lambda: w.events("reply_unroutable"), 5, "reply_unroutable logged")
    assert await app.queue_depth(topology.queue) == 0  # acked, not requeued forever
    await ledger.check("reply queue deleted before the reply")
    ROWS[-1].sent += 1  # the orphan: answered into the void, acked, not lost to the broker
    ROWS[-1].answered += 1


async def test_duplicate_message_id(topology, app, workers):
    w = await workers(topology, "--fake-step-s", "0.01")
    ledger = Ledger(app)
    for i in range(5):
        cid = await ledger.job(inputs=prompt(i), message_id=f"dup-{i}")
        for _ in range(2):  # a publisher retrying after a lost confirm: same ids
            await app.publish(inputs=prompt(i), message_id=f"dup-{i}", correlation_id=cid)
    await ledger.settle()
    submitted = [j for e in w.events("batch_submitted") for j in e["job_ids"]]
    assert sorted(submitted) == sorted(f"dup-{i}" for i in range(5)), submitted  # computed once
    await ledger.check("duplicate message_id (published 3 times each)", duplicates_allowed=True)


async def test_engine_failing_on_one_adapter(topology, app, workers):
    await workers(topology, "--fake-fail", "oom=internal:retryable",
                  "--fake-fail", "bad=adapter_invalid")
    ledger = Ledger(app)
    for i in range(12):
        adapter = ("oom", "bad", "good", None)[i % 4]
        expect = {"oom": ("error", "internal"), "bad": ("error", "adapter_invalid")}.get(
            adapter, ("result", None))
        await ledger.job(*expect, inputs=prompt(i), parameters={"adapter_id": adapter})
    await ledger.settle()
    await ledger.check("engine raising on one adapter (retryable until the limit; invalid)")


async def test_retries_back_off_and_stop_at_the_limit(workers):
    """An adapter source down for a while (two failures, then it loads) and one that never comes
    back: retried through the retry queue after growing delays; the first answered, the second
    dead-lettered after exactly delivery_limit + 1 runs with its reason."""
    topology = unique_topology(delivery_limit=3)
    app = await App(topology).open()
    try:
        w = await workers(topology, "--fake-fail", "down=adapter_not_found:retryable",
                          "--fake-fail-times", "down=2", "--fake-fail", "gone=adapter_not_found:retryable",
                          "--retry-delay-s", "0.2", "--retry-max-delay-s", "1.0", "--log-level", "debug")
        ledger = Ledger(app)
        for i in range(12):
            adapter = ("down", "gone", None)[i % 3]
            expect = ("error", "adapter_not_found") if adapter == "gone" else ("result", None)
            await ledger.job(*expect, inputs=prompt(i), parameters={"adapter_id": adapter},
                             message_id=f"retry-{topology.queue}-{i}")
        await ledger.settle(60)
        runs: dict[str, int] = defaultdict(int)
        for e in w.events("batch_submitted"):
            for job_id in e["job_ids"]:
                runs[job_id] += 1
        gone = [f"retry-{topology.queue}-{i}" for i in range(1, 12, 3)]
        assert {runs[j] for j in gone} == {topology.delivery_limit + 1}, dict(runs)
        delays = sorted({e["delay_s"] for e in w.events("job_retried")})
        assert delays == [0.2, 0.4, 0.8], delays
        await ledger.check(f"adapter source failing twice / for good: retried after {delays} s "
                           f"through the retry queue, dead-lettered after exactly "
                           f"{topology.delivery_limit + 1} runs")
    finally:
        await app.close()
        await delete_topology(topology)


async def test_api_token_stays_in_the_worker(topology, app, workers):
    """Jobs carrying an api_token that fail (the engine's error quotes the token) or are invalid:
    the token is in no reply, no log line of the worker, and no dead-letter copy."""
    token = "hf_FAULT_" + uuid.uuid4().hex
    w = await workers(topology, "--fake-fail", "private=adapter_not_found", "--log-level", "debug")
    ledger = Ledger(app)
    for i in range(6):
        params = {"adapter_id": ("private", None)[i % 2], "api_token": token}
        if i % 2:
            await ledger.job(inputs=prompt(i), parameters=params)
        else:
            await ledger.job("error", "adapter_not_found", inputs=prompt(i), parameters=params)
        bad = msgpack.packb({"inputs": prompt(i), "parameters": {**params, "max_new_tokens": 10**7}})
        await ledger.raw(bad, MSGPACK, "validation")
    await ledger.settle()
    dead = []  # read, held unacked, then put back for ledger.check
    queue = await app.channel.get_queue(topology.dead_queue, ensure=False)
    while (m := await queue.get(no_ack=False, fail=False)) is not None:
        dead.append(m)
    for m in dead:
        await m.nack(requeue=True)
    replies = [m.body for ms in app.replies.values() for m in ms]
    assert dead and all(token.encode() not in m.body for m in dead)
    assert all(token.encode() not in body for body in replies)
    assert token not in w.output and "(token ***)" in w.output  # quoted by the engine, scrubbed
    await ledger.check("jobs with an api_token failing (the error quotes it) or invalid: the token "
                       "in no reply, log line or dead letter")


async def test_jobs_past_their_deadline(topology, app, workers):
    w = await workers(topology, "--fake-slow", "slow=1.0")
    ledger = Ledger(app)
    await ledger.job(inputs="ahead", parameters={"adapter_id": "slow", "max_new_tokens": 1})
    await wait_for(lambda: w.events("batch_submitted"), 5, "the slow job running")
    now_ms = int(time.time() * 1000)
    for i in range(5):
        await ledger.job("error", "deadline_exceeded", inputs=prompt(i),
                         headers={"x-deadline-ms": now_ms - 1000})
        await ledger.job("error", "deadline_exceeded", inputs=prompt(i),
                         headers={"x-deadline-ms": now_ms + 300})  # expires while waiting
        await ledger.job(inputs=prompt(i))
    await ledger.settle()
    await ledger.check("jobs past their deadline (at arrival / while waiting)")



async def test_affinity_keeps_each_adapter_on_one_worker(topology, app, workers, affinity):
    flags = ("--affinity", "--max-batch", "32", "--prefetch", "64", "--fake-step-s", "0.005",
             "--log-level", "debug")
    pair = [await workers(topology, *flags), await workers(topology, *flags)]
    ledger = Ledger(app)
    adapters = [f"tenant-{k:02d}" for k in range(16)]
    adapter_of = {}
    for i in range(48):
        cid = await ledger.job(inputs=prompt(i), parameters={"adapter_id": adapters[i % 16]})
        adapter_of[cid] = adapters[i % 16]
    await ledger.settle()
    routes = [e["route"] for w in pair for e in w.events("job_received")]
    assert routes == ["affinity"] * 48  # each from its worker's own queue, none spilled
    ran_on: dict[str, set[int]] = defaultdict(set)  # adapter -> the workers that ran its jobs
    for n, w in enumerate(pair):
        for e in w.events("batch_submitted"):
            for job_id in e["job_ids"]:
                ran_on[adapter_of[job_id]].add(n)
    assert all(len(ran_on[a]) == 1 for a in adapters), dict(ran_on)
    assert set().union(*ran_on.values()) == {0, 1}  # spread over both (odds of not: 2**-15)
    await ledger.check("adapter affinity, 2 workers, 16 adapters: each adapter ran on one worker")


async def test_affinity_kill9_a_worker_while_its_queue_is_bound(topology, app, workers, affinity):
    flags = ("--affinity", "--max-batch", "4", "--prefetch", "4", "--fake-step-s", "0.02")
    a = await workers(topology, *flags)
    await workers(topology, *flags)
    a_queue = a.events("worker_started")[0]["affinity_queue"]
    ledger = Ledger(app)
    adapters = [f"tenant-{k}" for k in range(8)]
    for i in range(24):
        await ledger.job(inputs=prompt(i), parameters={"adapter_id": adapters[i % 8]})
    await wait_for(lambda: a.events("batch_submitted"), 10, "worker a running jobs")
    a.kill()  # SIGKILL: its unacked jobs go back to its queue, expired: dead-lettered onward
    for i in range(24, 40):  # some hash to a's queue, still bound: spilled to the shared queue
        await ledger.job(inputs=prompt(i), parameters={"adapter_id": adapters[i % 8]})
    assert await app.queue_depth(a_queue) == 0  # there (x-expires not yet), holding nothing
    await ledger.settle()
    await ledger.check("kill -9 an affinity worker mid-batch (its queue still bound)",
                       duplicates_allowed=True)


# ---- broker restart (restarts the shared broker: see the module docstring) ----------------------

def restart_broker(outage_s: float) -> None:
    """Stop the RabbitMQ application of this host, wait, start it again (the Erlang node stays up):
    every connection drops; durable queues and persistent messages survive."""
    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=180)

    try:
        ctl("stop_app")
        time.sleep(outage_s)
    finally:
        ctl("start_app")
        ctl("await_startup")


async def publish_until_confirmed(app: App, job: dict, timeout: float = 90.0) -> None:
    """What an at-least-once publisher does: retry (same ids) until the broker confirms."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.wait_for(app.publish(**job), 5)
            return
        except Exception:  # connection gone, channel closed, confirm lost: all transient here
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def settle_republishing(ledger: Ledger, jobs: dict[str, dict], quiet_s: float = 3.0,
                              timeout: float = 60.0) -> int:
    """Wait for every job's final reply; whenever none has come for `quiet_s`, republish the
    unanswered jobs (a client's reply timeout). Returns how many were republished."""
    republished = 0
    deadline = time.monotonic() + timeout
    answered, progress = -1, time.monotonic()
    while True:
        missing = [c for c in ledger.expected if not ledger._finals(c)]
        if not missing:
            break
        now = time.monotonic()
        assert now < deadline, f"{len(missing)} jobs unanswered after {timeout} s"
        if len(ledger.expected) - len(missing) != answered:
            answered, progress = len(ledger.expected) - len(missing), now
        elif now - progress > quiet_s:
            for cid in missing:
                await publish_until_confirmed(ledger.app, jobs[cid])
            republished += len(missing)
            progress = time.monotonic()
        await asyncio.sleep(0.1)
    await ledger.settle()  # and late duplicates
    return republished


@pytest.mark.broker_restart
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_broker_restart_mid_run(workers):
    """A worker and a robust client through `rabbitmqctl stop_app` / `start_app`. Jobs are
    persistent in the quorum queue; the client republishes (same ids) what is unconfirmed, and
    what is unanswered once the worker is back: replies in flight when the broker stopped, or
    published before the client redeclared its reply queue, are gone, and the worker answers the
    republished job from its result cache."""
    topology = unique_topology(delivery_limit=5)  # one restart costs a delivery; the limit holds
    app = await App(topology).open(robust=True)
    try:
        w = await workers(topology, "--max-batch", "8", "--prefetch", "16", "--fake-step-s",
                          "0.03", "--amqp-url", with_query(AMQP_URL, reconnect_interval=0.5))
        ledger = Ledger(app)
        jobs: dict[str, dict] = {}
        run = uuid.uuid4().hex[:8]

        async def publisher() -> None:
            for i in range(60):
                cid = f"restart-{run}-{i:03d}"
                jobs[cid] = dict(inputs=f"restart {i:03d}", stream=i % 3 == 0, correlation_id=cid,
                                 message_id=cid)
                ledger.expected[cid] = ("result", None)  # from the first publish attempt on
                await publish_until_confirmed(app, jobs[cid])
                await asyncio.sleep(0.05)

        publishing = asyncio.create_task(publisher())
        await wait_for(lambda: len(jobs) >= 20 and any(ledger._finals(c) for c in jobs), 20,
                       "jobs flowing before the restart")
        await asyncio.to_thread(restart_broker, 2.0)
        await asyncio.wait_for(publishing, 120)
        await wait_for(lambda: w.events("amqp_reconnected"), 30, "worker reconnected")

        republished = await settle_republishing(ledger, jobs)
        assert w.proc.poll() is None, w.output  # never crashed
        # the restart hit jobs in flight: redelivered, they joined the running job or hit the cache
        assert w.events("job_joined_inflight") or w.events("job_answered_from_cache"), w.output
        await ledger.check(f"broker restart mid-run (stop_app / start_app; the client republished "
                           f"{republished} unanswered jobs, same ids)", duplicates_allowed=True)
    finally:
        await app.close()
        await delete_topology(topology)
