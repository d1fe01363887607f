"""End to end (issue 3): real RabbitMQ, the real engine on a tiny random Llama with 12 PEFT adapters
of different ranks and target modules (tests/builders.py), one worker in this process. Every reply
must equal what the engine produces for the same request run directly on it, alone (greedy)."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import Future

import pytest
import structlog

from consumer import protocol
from consumer.jobs import to_request
from consumer.protocol import JSON, MSGPACK
from engine.engine import Engine
from engine.request import Completion, Outcome
from tests.amqp_helpers import App, worker_settings
from tests.builders import engine_with_adapters, running_worker

pytestmark = pytest.mark.slow

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# (rank, target modules, extra LoraConfig): ranks 2..16, attention / MLP / both, rsLoRA, rank_pattern
SPECS: list[tuple[int, tuple[str, ...], dict]] = [
    (8, ("q_proj", "v_proj"), {}),
    (4, ATTENTION, {}),
    (16, MLP, {}),
    (2, ATTENTION + MLP, {}),
    (8, ("o_proj", "down_proj"), {}),
    (16, ("q_proj", "k_proj"), {"use_rslora": True}),
    (4, ("v_proj", "up_proj"), {}),
    (8, ATTENTION, {"rank_pattern": {"v_proj": 2}}),
    (2, ("gate_proj",), {}),
    (16, ATTENTION + MLP, {}),
    (4, ("k_proj", "o_proj", "gate_proj"), {}),
    (8, ("up_proj", "down_proj"), {"alpha_pattern": {"down_proj": 4}}),
]
ADAPTERS = {  # adapter id -> make_adapter kwargs
    f"tenant-{k:02d}": dict(r=rank, alpha=2 * rank, targets=targets, **extra)
    for k, (rank, targets, extra) in enumerate(SPECS)
}
BURST = 60
MAX_BATCH = 32


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with engine_with_adapters(tmp_path_factory.mktemp("e2e"), ADAPTERS, max_batch=MAX_BATCH,
                              adapter_slots=16) as engine:
        yield engine


@pytest.fixture
async def worker(engine, topology):
    settings = worker_settings(topology, max_batch=MAX_BATCH, prefetch=2 * MAX_BATCH, batch_window_ms=20.0)
    async with running_worker(settings, engine) as w:
        yield w


def job(i: int) -> dict:
    """The i-th job of the burst: 12 adapters and the base model in turn, varied lengths."""
    adapters = [*ADAPTERS, None]
    return dict(inputs=f"job {i:02d}: the quick brown fox " + "jumps " * (i % 4),
                parameters={"adapter_id": adapters[i % len(adapters)],
                            "max_new_tokens": 6 + i % 7})


def direct(engine: Engine, jobs: list[dict], content_type: str = MSGPACK) -> list[Completion]:
    """Each job decoded as the worker decodes it, then run on the engine alone, one at a time."""
    results = []
    for k, kw in enumerate(jobs):
        body = protocol.encode_job(content_type=content_type, **kw)
        decoded = protocol.decode_job(body, content_type, None, f"direct-{uuid.uuid4().hex}-{k}",
                                      None, None, None, protocol.Limits())
        outcome: Future[Outcome] = Future()
        engine.submit(to_request(decoded, "local", time.time()), None, outcome.set_result)
        result = outcome.result(60)
        assert isinstance(result, Completion), result
        results.append(result)
    return results


def assert_same(app: App, cid: str, expected: Completion) -> dict:
    kind, body = app.final(cid)
    assert kind == "result", body
    finals = [m for m in app.replies[cid] if m.type != protocol.REPLY_TOKEN]
    assert finals[0].correlation_id == cid and body["id"] == cid
    assert body["generated_text"] == expected.text, (cid, body, expected)
    assert body["details"]["generated_tokens"] == expected.generated_tokens
    assert body["details"]["finish_reason"] == expected.finish_reason
    assert body["details"]["prompt_tokens"] == expected.prompt_tokens
    return body


async def test_burst_over_12_adapters_matches_the_engine_run_directly(engine, worker, app):
    jobs = [job(i) for i in range(BURST)]
    expected = direct(engine, jobs)
    assert len({r.text for r in expected}) > BURST // 2  # the adapters really change the output

    peak = {"running": 0, "active_adapters": 0}
    sampling = True

    async def sample_engine() -> None:  # the engine's own view: rows and adapters in one batch
        while sampling:
            stats = engine.stats()
            for k in peak:
                peak[k] = max(peak[k], stats[k])
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample_engine())
    with structlog.testing.capture_logs() as logs:
        cids = await asyncio.gather(*(app.publish(**kw) for kw in jobs))  # one burst
        for cid in cids:
            await app.wait(cid, timeout=120)
    sampling = False
    await sampler

    for i, (cid, result) in enumerate(zip(cids, expected, strict=True)):
        body = assert_same(app, cid, result)
        assert body["adapter_id"] == jobs[i]["parameters"]["adapter_id"]
        assert len(app.replies[cid]) == 1  # exactly one reply, no tokens (not streamed)

    batches = [e for e in logs if e["event"] == "batch_submitted"]
    assert sum(b["size"] for b in batches) == BURST
    assert any(b["size"] >= 4 and b["adapters"] >= 3 for b in batches), batches
    metric = worker.metrics.registry.get_sample_value
    assert metric("loraq_batch_size_count") == len(batches)
    assert metric("loraq_batch_size_bucket", {"le": "2.0"}) < len(batches)  # multi-job groups
    assert metric("loraq_batch_adapters_bucket", {"le": "2.0"}) < len(batches)  # 3+ adapters
    assert metric("loraq_jobs_finished_total", {"outcome": "result"}) == BURST
    assert peak["running"] >= 4 and peak["active_adapters"] >= 3, peak


async def test_json_chat_job_and_streaming_job(engine, worker, app):
    chat = dict(messages=[{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hello there"}],
                parameters={"adapter_id": "tenant-03", "max_new_tokens": 8, "details": True})
    streamed = dict(inputs="stream me please", stream=True,
                    parameters={"adapter_id": "tenant-09", "max_new_tokens": 10})
    (chat_expected,) = direct(engine, [chat], JSON)
    (stream_expected,) = direct(engine, [streamed])

    chat_cid = await app.publish(JSON, **chat)
    stream_cid = await app.publish(MSGPACK, **streamed)
    await app.wait(chat_cid, timeout=60)
    replies = await app.wait(stream_cid, timeout=60)

    body = assert_same(app, chat_cid, chat_expected)
    assert app.replies[chat_cid][0].content_type == JSON
    assert [t["id"] for t in body["details"]["tokens"]] == list(chat_expected.token_ids)

    assert [m.type for m in replies] == ["token"] * stream_expected.generated_tokens + ["result"]
    tokens = [protocol.decode(m.body, m.content_type) for m in replies[:-1]]
    assert all(m.correlation_id == stream_cid for m in replies)
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert [t["token"]["id"] for t in tokens] == list(stream_expected.token_ids)
    body = assert_same(app, stream_cid, stream_expected)
    assert "".join(t["token"]["text"] for t in tokens) == body["generated_text"]
