"""Client, SyncClient and `loraq generate` against the real RabbitMQ (LORAQ_TEST_AMQP_URL, default 127.0.0.1:5672).

A minimal in-test responder (a plain aio-pika consumer answering per protocol v1) stands in for
the worker, so these tests need no engine. Every test gets its own topology names.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import typing
import uuid
from pathlib import Path

import aio_pika
import pytest

from consumer import cli
from consumer.client import (
    BestOfSequence,
    Client,
    GenerationError,
    GenerationResult,
    GenerationTimeout,
    LoraqError,
    MergedAdapters,
    ResponseFormat,
    ScoredToken,
    SyncClient,
    Token,
    UnroutableError,
)
from consumer.logging import redact_url
from consumer.protocol import (
    JSON,
    MSGPACK,
    PARAMETER_NAMES,
    Details,
    ErrorReply,
    FinalReply,
    GenerateParameters,
    Job,
    Limits,
    ProtocolError,
    Reply,
    TokenReply,
    Topology,
    decode_job,
    encode,
)
from engine.request import SamplingParams, Timings
from tests.amqp_helpers import AMQP_URL, broker_connection_of

URL = AMQP_URL
ROOT = Path(__file__).resolve().parents[2]


class Responder:
    """Answers jobs like a worker would. The prompt picks the behaviour:
    `error:<type>` an error reply; `silent` nothing; `twice` nothing the first time that job id
    comes; `dup` every reply twice (tokens and result);
    `stray` a result for an unknown correlation id first; `details` a result with every typed detail
    (tokens with alternatives, prefill, best_of_sequences); anything else: the prompt upper-cased,
    streamed one character per token when the job asks for it."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.jobs: list[Job] = []
        self.properties: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def __aenter__(self) -> Responder:
        self.connection = await aio_pika.connect(URL)
        self.channel = await self.connection.channel()
        exchange = await self.channel.declare_exchange(
            self.topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        self.queue = await self.channel.declare_queue(self.topology.queue, auto_delete=True)
        await self.queue.bind(exchange, self.topology.routing_key)
        await self.queue.consume(self.on_job)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.connection.close()

    async def reply(self, job: Job, reply: Reply, correlation_id: str | None = None) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(encode(reply.to_wire(), job.content_type), content_type=job.content_type,
                             correlation_id=correlation_id or job.correlation_id, type=reply.KIND),
            routing_key=job.reply_to)

    async def on_job(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            job = decode_job(message.body, message.content_type, message.headers,
                             message.message_id, message.correlation_id, message.reply_to,
                             message.expiration, Limits())
            self.jobs.append(job)
            self.properties.append(message)
            prompt = job.inputs if job.inputs is not None else job.messages[-1]["content"]
            times = 2 if prompt == "dup" else 1
            if prompt == "silent" or prompt == "twice" and sum(j.id == job.id for j in self.jobs) < 2:
                return
            if prompt.startswith("error:"):
                error_type = prompt.split(":", 1)[1]
                for _ in range(times):
                    await self.reply(job, ErrorReply(job.id, error_type, f"bad {error_type}",
                                                     error_type == "overloaded"))
                return
            text = prompt.upper()
            if prompt == "stray":
                await self.reply(job, self.result(job, "NOT YOURS"), uuid.uuid4().hex)
            if job.stream:
                for i, ch in enumerate(text):
                    for _ in range(times):
                        await self.reply(job, TokenReply(job.id, Token(i, ord(ch), ch, -0.5)))
            for _ in range(times):
                await self.reply(job, self.detailed(job) if prompt == "details" else self.result(job, text))

    @staticmethod
    def detailed(job: Job) -> FinalReply:
        prefill = (ScoredToken(1, "<s>", None), ScoredToken(70, "d", -1.5))
        tokens = (Token(0, 79, "O", -0.1, alternative_tokens=(ScoredToken(79, "O", -0.1), ScoredToken(75, "K", -2.5))),
                  Token(1, 2, "", -0.2, special=True))
        other = BestOfSequence(generated_text="NO", finish_reason="eos_token", generated_tokens=2, seed=8,
                               prefill=prefill, tokens=tokens)
        return GenerationResult(
            id=job.id, generated_text="O", adapter_id=None,
            details=Details(finish_reason="eos_token", prompt_tokens=2, generated_tokens=2, seed=7,
                            tokens=tokens, prefill=prefill, best_of_sequences=(other,)),
            timings=Timings(queue_ms=1.0, adapter_load_ms=0.0, ttft_ms=2.0, total_ms=3.0))

    @staticmethod
    def result(job: Job, text: str) -> FinalReply:
        return GenerationResult(
            id=job.id, generated_text=text, adapter_id=job.adapter_id,
            details=Details(finish_reason="length", prompt_tokens=3, generated_tokens=len(text)),
            timings=Timings(queue_ms=1.0, adapter_load_ms=0.0, ttft_ms=2.0, total_ms=3.0))


@pytest.fixture
async def responder(topology):
    async with Responder(topology) as r:
        yield r


@pytest.fixture
async def client(topology):
    async with Client(URL, topology=topology, timeout=5.0) as c:
        yield c


async def test_unroutable_raises_at_once(client):
    start = time.monotonic()
    with pytest.raises(UnroutableError, match="no queue is bound"):
        await client.generate("hi", timeout=30)
    assert time.monotonic() - start < 2.0
    assert client._pending == {}


async def test_no_worker_times_out_cleanly(client, topology):
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.queue, auto_delete=False)
        await queue.bind(topology.exchange, topology.routing_key)
        start = time.monotonic()
        with pytest.raises(GenerationTimeout) as info:
            await client.generate("hi", timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 2.0
        assert isinstance(info.value, TimeoutError) and info.value.job_id
        assert client._pending == {}
        with pytest.raises(GenerationTimeout):
            async for _ in client.generate_stream("hi", timeout=0.2):
                pass
        assert client._pending == {}
        assert (await queue.declare()).message_count == 2  # published, persistent, unconsumed


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
async def test_result(topology, responder, content_type):
    async with Client(URL, topology=topology, content_type=content_type, timeout=5.0) as client:
        result = await client.generate("hello", adapter_id="acme/bot", max_new_tokens=7,
                                       temperature=0.5, stop=["\n"], seed=3, job_id="job-1")
    assert isinstance(result, GenerationResult)
    assert result.generated_text == "HELLO"
    assert result.id == "job-1" and result.adapter_id == "acme/bot"
    assert result.details.finish_reason == "length" and result.details.generated_tokens == 5
    assert result.timings.ttft_ms == 2.0
    assert result.to_wire()["generated_text"] == "HELLO"
    (job,), (message,) = responder.jobs, responder.properties
    assert job.id == "job-1" and job.content_type == content_type and not job.stream
    sampling = job.parameters.sampling
    assert sampling.max_new_tokens == 7 and sampling.temperature == 0.5
    assert sampling.stop == ("\n",) and sampling.seed == 3
    assert message.message_id == "job-1" and message.correlation_id != "job-1"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.reply_to == client._reply_queue


async def test_chat_messages_and_deadline(client, responder):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hey"}]
    before = time.time() * 1000
    result = await client.generate(messages=messages, deadline=10.0)
    assert result.generated_text == "HEY" and result.adapter_id is None
    (job,) = responder.jobs
    assert job.messages == tuple(messages) and job.inputs is None
    assert before + 9_000 < job.deadline_ms < time.time() * 1000 + 11_000


async def test_stream_yields_tokens_then_result(client, responder):
    items = [item async for item in client.generate_stream("abc", adapter_id="x")]
    assert [t.text for t in items[:-1]] == ["A", "B", "C"]
    assert [t.index for t in items[:-1]] == [0, 1, 2]
    assert all(isinstance(t, Token) and t.logprob == -0.5 for t in items[:-1])
    assert isinstance(items[-1], GenerationResult) and items[-1].generated_text == "ABC"
    assert responder.jobs[0].stream
    assert client._pending == {}


@pytest.mark.parametrize("error_type,retryable", [("adapter_not_found", False), ("overloaded", True)])
async def test_error_reply_raises(client, responder, error_type, retryable):
    with pytest.raises(GenerationError) as info:
        await client.generate(f"error:{error_type}", job_id="j-err")
    e = info.value
    assert (e.error_type, e.message, e.retryable, e.job_id) == (error_type, f"bad {error_type}",
                                                                retryable, "j-err")
    with pytest.raises(GenerationError):
        async for _ in client.generate_stream(f"error:{error_type}"):
            pass
    assert client._pending == {}


async def test_duplicate_and_unknown_replies_dropped(client, responder):
    assert (await client.generate("dup")).generated_text == "DUP"
    items = [i async for i in client.generate_stream("dup")]
    assert [t.text for t in items[:-1]] == ["D", "U", "P"]  # each token was sent twice
    assert (await client.generate("stray")).generated_text == "STRAY"  # not "NOT YOURS"
    with pytest.raises(GenerationError):
        await client.generate("error:internal")  # a duplicate error after it is dropped too
    await asyncio.sleep(0.1)  # let the late duplicates arrive
    assert client._pending == {}
    assert (await client.generate("after")).generated_text == "AFTER"


async def test_concurrent_jobs_matched_by_correlation_id(client, responder):
    prompts = [f"p{i}" for i in range(30)]
    results = await asyncio.gather(*(client.generate(p) for p in prompts))
    assert [r.generated_text for r in results] == [p.upper() for p in prompts]
    assert len({m.correlation_id for m in responder.properties}) == 30


async def test_bad_arguments_never_publish(client, responder):
    with pytest.raises(TypeError, match="max_tokens"):
        await client.generate("hi", max_tokens=3)
    with pytest.raises(TypeError, match="max_tokens"):
        await anext(client.generate_stream("hi", max_tokens=3))
    with pytest.raises(ProtocolError):
        await client.generate("hi", max_new_tokens="3")
    with pytest.raises(ProtocolError):
        await client.generate("hi", messages=[{"role": "user", "content": "x"}])
    await asyncio.sleep(0.1)
    assert responder.jobs == []


SCHEMA = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}}, "required": ["label"]}


async def test_every_wire_parameter_is_a_typed_keyword(client, responder):
    """Each wire parameter by name, typed; the job the worker decodes carries every value."""
    merge = MergedAdapters(ids=("a/x", "a/y"), weights=(0.7, 0.3), merge_strategy="ties", density=0.5)
    await client.generate(
        "hi", adapter_source="hub", api_token="tok", merged_adapters=merge, max_new_tokens=9, do_sample=True,
        temperature=0.5, top_k=4, top_p=0.9, typical_p=0.8, repetition_penalty=1.1, frequency_penalty=0.3,
        presence_penalty=-0.2, stop="\n", best_of=2, details=True, decoder_input_details=True,
        return_k_alternatives=3, ignore_eos_token=True, return_full_text=True, truncate=100,
        response_format=ResponseFormat.json_schema(SCHEMA))
    await client.generate(messages=[{"role": "user", "content": "[]"}], apply_chat_template=None,
                          response_format={"type": "regex", "pattern": "[a-z]+"}, watermark=False, seed=5)
    first, second = responder.jobs
    p = first.parameters
    assert (p.adapter_id, p.adapter_source, p.api_token, p.merged_adapters) == (None, "hub", "tok", merge)
    assert p.return_full_text and p.truncate == 100
    assert p.response_format == ResponseFormat.json_schema(SCHEMA)
    assert p.sampling == SamplingParams(
        max_new_tokens=9, do_sample=True, temperature=0.5, top_k=4, top_p=0.9, typical_p=0.8,
        repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=-0.2, stop=("\n",), best_of=2,
        logprobs=True, prompt_logprobs=True, return_k_alternatives=3, ignore_eos=True)
    assert second.parameters.response_format == ResponseFormat("regex", "[a-z]+")
    assert second.parameters.sampling == SamplingParams(seed=5)  # None: the wire's defaults
    with pytest.raises(ProtocolError, match="parameters.watermark"):
        await client.generate("hi", watermark=True)  # refused by name before publishing


def test_generate_parameters_are_the_wire_parameters():
    """The typed keywords are the wire's parameters, every one optional and typed."""
    assert tuple(GenerateParameters.__annotations__) == PARAMETER_NAMES
    assert GenerateParameters.__optional_keys__ == frozenset(PARAMETER_NAMES)
    hints = typing.get_type_hints(GenerateParameters)
    assert all(type(None) in typing.get_args(hints[name]) for name in PARAMETER_NAMES)  # None: the default


@pytest.mark.parametrize("method", [Client.generate, Client.generate_stream, SyncClient.generate,
                                    SyncClient.generate_stream])
def test_signatures_type_the_wire_parameters_once(method):
    params = inspect.signature(method).parameters
    assert list(params) == ["self", "inputs", "messages", "timeout", "job_id", "deadline", "parameters"]
    assert params["parameters"].kind is inspect.Parameter.VAR_KEYWORD
    assert typing.get_type_hints(method)["parameters"] == typing.Unpack[GenerateParameters]


async def test_sync_client_refuses_unknown_keywords(topology, responder):
    def run() -> None:
        with SyncClient(URL, topology=topology, timeout=5.0) as client:
            with pytest.raises(TypeError, match="max_tokens"):
                client.generate("hi", max_tokens=3)
            with pytest.raises(TypeError, match="max_tokens"):
                next(client.generate_stream("hi", max_tokens=3))

    await asyncio.to_thread(run)
    await asyncio.sleep(0.1)
    assert responder.jobs == []


async def test_results_carry_typed_details(client, responder):
    result = await client.generate("details", details=True, decoder_input_details=True, return_k_alternatives=2)
    d = result.details
    assert d.prefill == (ScoredToken(1, "<s>", None), ScoredToken(70, "d", -1.5))
    assert [t.alternative_tokens for t in d.tokens] == [(ScoredToken(79, "O", -0.1), ScoredToken(75, "K", -2.5)),
                                                         None]
    assert d.tokens[1].special and isinstance(d.tokens[0], Token)
    (other,) = d.best_of_sequences
    assert isinstance(other, BestOfSequence) and (other.generated_text, other.seed) == ("NO", 8)
    assert other.prefill == d.prefill and other.tokens == d.tokens


async def test_content_parts_through_the_client(client, responder):
    parts = [{"role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]}]
    assert (await client.generate(messages=parts)).generated_text == "HEY"
    assert responder.jobs[0].messages[1] == {"role": "user", "content": "hey"}
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]
    with pytest.raises(ProtocolError, match=r"^messages\[0\]\.content\[0\]\.type 'image_url'"):
        await client.generate(messages=image)


async def test_not_connected():
    with pytest.raises(LoraqError, match="not connected"):
        await Client(URL).generate("hi")


async def test_the_timeout_is_the_jobs_deadline_by_default(client, responder):
    """A caller that stops waiting stops the work: the job carries its timeout as x-deadline-ms."""
    before = time.time() * 1000
    assert (await client.generate("a", timeout=4.0)).generated_text == "A"
    assert (await client.generate("b", timeout=4.0, deadline=30.0)).generated_text == "B"
    items = [i async for i in client.generate_stream("c", timeout=4.0)]
    assert items[-1].generated_text == "C"
    a, b, c = (j.deadline_ms for j in responder.jobs)
    assert before + 3_000 < a < time.time() * 1000 + 4_000
    assert b > before + 29_000
    assert before + 3_000 < c < time.time() * 1000 + 4_000


async def test_several_broker_urls(topology, responder):
    """A comma-separated string or a list; a node that does not answer is skipped."""
    dead = "amqp://guest:guest@127.0.0.1:1/"
    for urls in (f"{dead},{URL}", [dead, URL]):
        async with Client(urls, topology=topology, timeout=5.0) as client:
            assert (await client.generate("nodes")).generated_text == "NODES"
            assert client._connection.current_url == redact_url(URL)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_a_lost_connection_republishes_waiting_jobs(topology, responder):
    """Replies sent while the client was away are lost with its reply queue: after reconnecting
    it publishes every waiting job again (same job id), and the job is answered then."""
    async with Client(URL + "?reconnect_interval=0.3", topology=topology, timeout=20.0) as client:
        task = asyncio.create_task(client.generate("twice", job_id="again"))
        await wait_until(lambda: len(responder.jobs) == 1)
        connection = await asyncio.to_thread(broker_connection_of, os.getpid(), "client")
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "close_connection", connection,
                                                 "client test"], check=True, capture_output=True)
        assert (await task).generated_text == "TWICE"
    assert [j.id for j in responder.jobs] == ["again", "again"]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_close_fails_in_flight_jobs(client, responder):
    task = asyncio.create_task(client.generate("silent", timeout=10))
    while not responder.jobs:
        await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(LoraqError, match="closed"):
        await task
    with pytest.raises(LoraqError, match="not connected"):
        await client.generate("hi")


async def test_sync_client(topology, responder):
    def run() -> tuple[str, list]:
        with SyncClient(URL, topology=topology, timeout=5.0) as client:
            text = client.generate("sync", adapter_id="a").generated_text
            items = list(client.generate_stream("xy"))
            stream = client.generate_stream("early")
            next(stream)
            stream.close()  # an early stop releases the job
            pending = dict(client._client._pending)
            with pytest.raises(GenerationError):
                client.generate("error:validation")
        return text, items, pending

    text, items, pending = await asyncio.to_thread(run)
    assert text == "SYNC"
    assert [i.text for i in items[:-1]] == ["X", "Y"] and items[-1].generated_text == "XY"
    assert pending == {}


async def test_sync_client_connect_failure_stops_its_thread():
    with pytest.raises(ConnectionError):
        await asyncio.to_thread(SyncClient, "amqp://guest:guest@127.0.0.1:1/")
    assert "loraq-client" not in {t.name for t in threading.enumerate()}


def _cli_args(topology: Topology, *args: str) -> list[str]:
    return ["generate", *args, "--amqp-url", URL, "--exchange", topology.exchange, "--timeout", "5"]


async def test_cli_generate(topology, responder, capsys):
    rc = await asyncio.to_thread(cli.main, _cli_args(topology, "hello cli", "--adapter-id", "a/b",
                                                     "--max-new-tokens", "9", "--temperature", "0.7"))
    assert rc == 0 and capsys.readouterr().out == "HELLO CLI\n"
    job = responder.jobs[-1]
    assert job.adapter_id == "a/b" and job.parameters.sampling.max_new_tokens == 9
    assert job.parameters.sampling.temperature == 0.7 and job.content_type == MSGPACK

    rc = await asyncio.to_thread(cli.main, _cli_args(topology, "streamed", "--stream"))
    assert rc == 0 and capsys.readouterr().out == "STREAMED\n"

    rc = await asyncio.to_thread(cli.main, _cli_args(
        topology, "hi", "--json", "--chat", "--system", "sys", "--content-type", "json"))
    assert rc == 0 and json.loads(capsys.readouterr().out)["generated_text"] == "HI"
    assert responder.jobs[-1].messages[0] == {"role": "system", "content": "sys"}
    assert responder.jobs[-1].content_type == JSON

    rc = await asyncio.to_thread(cli.main, _cli_args(topology, "ab", "--stream", "--json"))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [x.get("text") for x in lines[:2]] == ["A", "B"]
    assert lines[-1]["generated_text"] == "AB"

    rc = await asyncio.to_thread(cli.main, _cli_args(topology, "error:adapter_invalid"))
    assert rc == 1 and "adapter_invalid: bad adapter_invalid" in capsys.readouterr().err


async def test_cli_generate_lorax_parameters(topology, responder, capsys, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    merge = '{"ids": ["a/x", "a/y"], "weights": [1, 2]}'
    rc = await asyncio.to_thread(cli.main, _cli_args(
        topology, "details", "--json", "--response-format-json", str(schema_file), "--best-of", "2",
        "--do-sample", "--truncate", "50", "--decoder-input-details", "--details", "--return-k-alternatives", "2",
        "--frequency-penalty", "0.5", "--presence-penalty", "0.25", "--merged-adapters", merge,
        "--ignore-eos-token", "--return-full-text"))
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["details"]["prefill"][1]["logprob"] == -1.5
    assert out["details"]["best_of_sequences"][0]["generated_text"] == "NO"
    p = responder.jobs[-1].parameters
    assert p.response_format == ResponseFormat.json_schema(SCHEMA) and p.truncate == 50 and p.return_full_text
    assert p.merged_adapters == MergedAdapters(ids=("a/x", "a/y"), weights=(1.0, 2.0))
    s = p.sampling
    assert (s.best_of, s.prompt_logprobs, s.logprobs, s.return_k_alternatives) == (2, True, True, 2)
    assert (s.frequency_penalty, s.presence_penalty, s.ignore_eos) == (0.5, 0.25, True)

    rc = await asyncio.to_thread(cli.main, _cli_args(
        topology, "abc", "--response-format-json", json.dumps(SCHEMA)))
    assert rc == 0 and responder.jobs[-1].parameters.response_format == ResponseFormat.json_schema(SCHEMA)
    rc = await asyncio.to_thread(cli.main, _cli_args(topology, "abc", "--response-format-regex", "[A-Z]+"))
    assert rc == 0 and responder.jobs[-1].parameters.response_format == ResponseFormat("regex", "[A-Z]+")
    capsys.readouterr()
    jobs = len(responder.jobs)
    for bad, message in ((["--merged-adapters", '{"ids": ["a"], "weights": []}'], "merged_adapters.weights"),
                         (["--merged-adapters", "{nope"], "--merged-adapters: not JSON"),
                         (["--response-format-json", "missing.json"], "--response-format-json: not JSON"),
                         (["--merged-adapters", merge, "--adapter-id", "a/x"], "at most one of adapter_id")):
        rc = await asyncio.to_thread(cli.main, _cli_args(topology, "abc", *bad))
        assert rc == 1 and message in capsys.readouterr().err, bad
    assert len(responder.jobs) == jobs  # refused before publishing


async def test_cli_generate_unroutable(topology, capsys):
    rc = await asyncio.to_thread(cli.main, _cli_args(topology, "hi"))
    assert rc == 1 and "unroutable" in capsys.readouterr().err


def test_cli_delegates_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATES, "bench e2e", "consumer.no_such_bench:main")
    assert cli.main(["bench", "e2e", "--flag"]) == 2
    assert "consumer.no_such_bench is not part of this install" in capsys.readouterr().err


def test_cli_delegates_argv(monkeypatch, tmp_path):
    module = tmp_path / "fake_loraq_bench.py"
    module.write_text("seen = []\ndef main(argv):\n    seen.append(argv)\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.DELEGATES, "bench adapters", "fake_loraq_bench:main")
    assert cli.main(["bench", "adapters", "--help", "-n", "2"]) == 3
    assert sys.modules["fake_loraq_bench"].seen == [["--help", "-n", "2"]]


def _pika_example():
    spec = importlib.util.spec_from_file_location("publish_pika", ROOT / "examples" / "publish_pika.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.skipif(importlib.util.find_spec("pika") is None, reason="pika not installed")
async def test_plain_pika_example(topology, responder, capsys):
    example = _pika_example()
    argv = ["plain amqp", "--adapter-id", "p", "--amqp-url", URL, "--exchange", topology.exchange,
            "--timeout", "5"]
    assert await asyncio.to_thread(example.main, argv) == 0
    assert capsys.readouterr().out == "PLAIN AMQP\n"
    assert await asyncio.to_thread(example.main, [*argv, "--stream"]) == 0
    assert capsys.readouterr().out == "PLAIN AMQP\n"
    assert responder.jobs[-1].content_type == JSON and responder.jobs[-1].adapter_id == "p"


@pytest.mark.parametrize("healthy", [True, False])
async def test_cli_health(healthy, capsys):
    from consumer.metrics import Metrics, MetricsServer

    server = MetricsServer(Metrics(), lambda: healthy)
    port = await server.start("127.0.0.1", 0)
    try:
        rc = await asyncio.to_thread(cli.main, ["health", "--port", str(port)])
        live = await asyncio.to_thread(cli.main, ["health", "--live", "--port", str(port)])
    finally:
        await server.close()
    assert rc == (0 if healthy else 1)
    assert live == 0  # alive, ready or not
    assert await asyncio.to_thread(cli.main, ["health", "--port", str(port)]) == 1  # closed


@pytest.mark.skipif(importlib.util.find_spec("pika") is None, reason="pika not installed")
def test_plain_pika_example_unroutable(capsys):
    example = _pika_example()
    # no such exchange at all: the broker closes the channel (404), reported as unroutable
    assert example.main(["hi", "--amqp-url", URL, "--exchange", f"nope-{uuid.uuid4().hex}"]) == 2
    assert "unroutable" in capsys.readouterr().err
