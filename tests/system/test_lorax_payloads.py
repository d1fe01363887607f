"""LoRAX `/generate` bodies published unchanged (no `v`) through real RabbitMQ to a worker on the real
engine (tiny random Llama + one PEFT adapter): LoRAX's defaults and sampling rule apply, every field
is honoured or refused by name, and LoRAX's own client types (`lorax.types`) parse the replies."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import Future

import pytest

from consumer import protocol
from consumer.jobs import to_request
from consumer.protocol import JSON
from engine.engine import Engine
from engine.request import Completion, Outcome
from tests.amqp_helpers import App, worker_settings
from tests.builders import engine_with_adapters, running_worker

lorax_types = pytest.importorskip("lorax.types")  # scripts/test.sh installs lorax-client

MAX_NEW_TOKENS = 24  # the worker's --max-new-tokens: what a LoRAX body without max_new_tokens gets


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    adapters = {"acme": dict(r=4, targets=("q_proj", "v_proj", "o_proj"))}
    with engine_with_adapters(tmp_path_factory.mktemp("lorax"), adapters, seed=5) as engine:
        yield engine


@pytest.fixture
async def worker(engine, topology):
    async with running_worker(worker_settings(topology, max_new_tokens=MAX_NEW_TOKENS), engine) as w:
        yield w


async def ask(app: App, body: dict) -> tuple[str, dict, list]:
    """Publish `body` as JSON, exactly as a LoRAX client would send it; (type, final body, replies)."""
    cid = await app.publish_raw(json.dumps(body).encode(), JSON)
    replies = await app.wait(cid, timeout=60)
    kind, final = app.final(cid)
    return kind, final, replies


def direct(engine: Engine, body: dict) -> Completion:
    """The body decoded as the worker decodes it, run on the engine alone."""
    job = protocol.decode_job(json.dumps(body).encode(), JSON, None, f"direct-{uuid.uuid4().hex}", None, None,
                              None, protocol.Limits(max_new_tokens=MAX_NEW_TOKENS))
    outcome: Future[Outcome] = Future()
    engine.submit(to_request(job, "local", time.time()), None, outcome.set_result)
    result = outcome.result(60)
    assert isinstance(result, Completion), result
    return result


async def test_detailed_lorax_body_parses_with_loraxs_client(engine, worker, app):
    body = {"inputs": "Tell me about the sea and the ships upon it", "parameters": {
        "adapter_id": "acme", "temperature": 0, "max_new_tokens": 7, "ignore_eos_token": True,
        "truncate": 10, "details": True, "decoder_input_details": True, "return_k_alternatives": 3,
        "repetition_penalty": 1.2, "frequency_penalty": 0.3, "presence_penalty": 0.1,
        "stop": ["never in the output"], "watermark": False, "return_full_text": False,
        "apply_chat_template": False}}
    expected = direct(engine, body)
    kind, final, _ = await ask(app, body)
    assert kind == "result", final
    r = lorax_types.Response(**final)
    d = r.details
    assert r.generated_text == expected.text and d.finish_reason == "length" and d.generated_tokens == 7
    assert d.prompt_tokens == 10 and len(d.prefill) == 10  # truncate: the last 10 prompt tokens
    assert d.prefill[0].logprob is None and all(t.logprob <= 0 for t in d.prefill[1:])
    assert [t.id for t in d.tokens] == list(expected.token_ids) and d.seed is None  # greedy
    assert all(len(t.alternative_tokens) == 3 for t in d.tokens)
    assert [t.special for t in d.tokens] == [t.id < 3 for t in d.tokens]  # the test tokenizer's 3 specials
    assert final["details"]["skipped_tokens"] == 0


async def test_lorax_defaults_and_sampling_rule(engine, worker, app):
    """No `v`: a warper alone samples, and max_new_tokens defaults to what the context allows (the
    worker's limit); the v1 body with the same parameters stays greedy and stops at 64."""
    lorax_body = {"inputs": "Once upon a time", "parameters": {"temperature": 1.7, "seed": 7,
                                                               "ignore_eos_token": True}}
    kind, sampled, _ = await ask(app, lorax_body)
    assert kind == "result" and sampled["details"]["generated_tokens"] == MAX_NEW_TOKENS
    assert sampled["details"]["seed"] == 7
    v1: dict = {"v": 1, "inputs": "Once upon a time", "parameters": {"temperature": 1.7, "seed": 7,
                                                                     "ignore_eos_token": True,
                                                                     "max_new_tokens": MAX_NEW_TOKENS}}
    _, greedy, _ = await ask(app, v1)
    v1["parameters"]["do_sample"] = True
    _, explicit, _ = await ask(app, v1)
    assert sampled["generated_text"] == explicit["generated_text"] != greedy["generated_text"]
    assert sampled["generated_text"] == direct(engine, lorax_body).text  # the same seed, another batch
    _, zero, _ = await ask(app, {"inputs": "Once upon a time", "parameters": {"temperature": 0, "max_new_tokens": 5}})
    assert zero["details"]["seed"] is None and lorax_types.Response(**zero).details.generated_tokens <= 5


async def test_best_of_and_chat_template(engine, worker, app):
    kind, final, replies = await ask(app, {"inputs": "Pick a colour:", "parameters": {
        "best_of": 2, "do_sample": True, "max_new_tokens": 6, "details": True, "return_full_text": True}})
    assert kind == "result" and len(replies) == 1
    d = lorax_types.Response(**final).details
    (other,) = d.best_of_sequences
    assert final["generated_text"].startswith("Pick a colour:") and other.generated_text.startswith("Pick a colour:")
    assert d.seed != other.seed and len(d.tokens) == d.generated_tokens
    mean = sum(t.logprob for t in d.tokens) / len(d.tokens)
    assert mean >= sum(t.logprob for t in other.tokens) / len(other.tokens)

    chat = [{"role": "user", "content": "hello there"}]
    _, templated, _ = await ask(app, {"inputs": json.dumps(chat), "parameters": {
        "apply_chat_template": True, "max_new_tokens": 6}})
    _, as_messages, _ = await ask(app, {"messages": chat, "parameters": {"max_new_tokens": 6}})
    assert templated["generated_text"] == as_messages["generated_text"]
    assert templated["details"]["prompt_tokens"] == as_messages["details"]["prompt_tokens"]


async def test_streamed_tokens_parse_as_loraxs_tokens(engine, worker, app):
    _, final, replies = await ask(app, {"inputs": "stream it", "stream": True, "parameters": {
        "max_new_tokens": 4, "ignore_eos_token": True, "details": True, "return_k_alternatives": 2}})
    tokens = [protocol.decode(m.body, m.content_type)["token"] for m in replies if m.type == "token"]
    parsed = [lorax_types.Token(**t) for t in tokens]
    assert len(parsed) == 4 and all(len(t.alternative_tokens) == 2 for t in parsed)
    assert "".join(t.text for t in parsed) == final["generated_text"]


@pytest.mark.parametrize("parameters,field", [
    ({"watermark": True}, "parameters.watermark"),
    ({"best_of": 2}, "parameters.best_of"),  # LoRAX: best_of needs sampling
    ({"best_of": 2, "do_sample": True, "seed": 1}, "parameters.seed"),
    ({"truncate": 0}, "parameters.truncate"),
    ({"frequency_penalty": 5}, "parameters.frequency_penalty"),
    ({"adapter_source": "pbase"}, "parameters.adapter_source"),
])
async def test_refused_fields_are_named(engine, worker, app, parameters, field):
    kind, final, _ = await ask(app, {"inputs": "x", "parameters": parameters})
    assert kind == "error" and final["error_type"] == "validation" and final["error"].startswith(field)
    (dead,) = await app.dead(1)
    assert dead.headers[protocol.HEADER_ERROR].startswith(field)
