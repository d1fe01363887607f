"""Issue 14 end to end: a real worker process (`python -m consumer`) on a tiny random Llama with two
PEFT adapters, the gateway in front of it, and the real clients. Greedy text through lorax-client
and through the openai SDK equals the text of the same job published straight to the broker; the
LoRAX fields the wire carries (structured output, best_of, decoder_input_details, alternatives)
and OpenAI's response_format, logprobs / top_logprobs, n and seed work through both clients."""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import openai
import pytest
from lorax import AsyncClient, Client

from consumer.worker_process import WorkerProcess, free_port, topology_args
from tests.amqp_helpers import AMQP_URL, App, delete_topology, unique_topology
from tests.builders import make_adapter, make_tiny_model
from tests.gateway.harness import GatewayThread, gateway_settings

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")]

BASE = "tiny-llama"
ADAPTERS = ("tenant-a", "tenant-b")
NEW_TOKENS = 12
CONTEXT = 512  # make_tiny_model's max_positions: the worker's context (its --max-new-tokens is 4096)
PROMPTS = {None: "The quick brown fox", "tenant-a": "Once upon a time", "tenant-b": "Dear support team,"}
VERDICT = {"type": "object", "additionalProperties": False, "required": ["label", "confidence"],
           "properties": {"label": {"enum": ["spam", "ham"]},
                          "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(gateway, topology): a real worker on a tiny model and its adapters, and a gateway."""
    root = tmp_path_factory.mktemp("gateway_real")
    model = make_tiny_model(root / "model")
    make_adapter(model, root / "adapters" / "tenant-a", r=8, targets=("q_proj", "v_proj"), seed=1)
    make_adapter(model, root / "adapters" / "tenant-b", r=4, targets=("o_proj", "down_proj"), seed=2)
    topology = unique_topology()
    worker = WorkerProcess(
        [*topology_args(topology), "--amqp-url", AMQP_URL, "--model", str(model),
         "--adapter-root", str(root / "adapters"), "--device", "cpu", "--dtype", "float32",
         "--max-batch", "8", "--prefetch", "16", "--shutdown-grace-s", "2"],
        root / "worker.log", free_port())
    worker.start()
    gateway = None
    try:
        asyncio.run(worker.wait_healthy(180))
        gateway = GatewayThread(gateway_settings(topology, model=BASE,
                                                 adapter_root=str(root / "adapters")))
        yield gateway, topology
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop(10)
        asyncio.run(delete_topology(topology))


async def amqp_result(topology, **job) -> dict:
    """The job published straight to the broker (plain aio-pika): its result reply."""
    app = await App(topology).open()
    try:
        cid = await app.publish(**job)
        await app.wait(cid, timeout=60)
        kind, body = app.final(cid)
        assert kind == "result", body
        return body
    finally:
        await app.close()


def stream_text(client: Client, prompt: str, adapter: str | None) -> str:
    return "".join(e.token.text for e in client.generate_stream(prompt, adapter_id=adapter,
                                                                max_new_tokens=NEW_TOKENS))


async def test_greedy_text_equals_the_amqp_path(stack):
    gateway, topology = stack
    lorax = Client(gateway.url, timeout=60)
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=60)
    assert [m.id for m in oai.models.list().data] == [BASE, *ADAPTERS]
    for adapter, prompt in PROMPTS.items():
        params = {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS}
        direct = (await amqp_result(topology, inputs=prompt, parameters=params))["generated_text"]
        messages = [{"role": "user", "content": prompt}]
        chat_result = await amqp_result(topology, messages=messages, parameters=params)
        direct_chat = chat_result["generated_text"]

        r = await asyncio.to_thread(lorax.generate, prompt, adapter_id=adapter,
                                    max_new_tokens=NEW_TOKENS)
        assert r.generated_text == direct, adapter
        streamed = await asyncio.to_thread(stream_text, lorax, prompt, adapter)
        assert streamed == direct, adapter

        model = adapter or BASE
        c = await asyncio.to_thread(oai.completions.create, model=model, prompt=prompt,
                                    temperature=0, max_tokens=NEW_TOKENS)
        assert c.choices[0].text == direct, adapter
        chat = await asyncio.to_thread(oai.chat.completions.create, model=model, messages=messages,
                                       temperature=0, max_tokens=NEW_TOKENS)
        assert chat.choices[0].message.content == direct_chat, adapter
        assert chat.usage.completion_tokens == chat_result["details"]["generated_tokens"]
        assert chat.usage.prompt_tokens == chat_result["details"]["prompt_tokens"]


async def test_async_clients_stream_the_same_text(stack):
    gateway, topology = stack
    prompt, adapter = PROMPTS["tenant-a"], "tenant-a"
    direct = (await amqp_result(topology, inputs=prompt, parameters={
        "adapter_id": adapter, "max_new_tokens": NEW_TOKENS}))["generated_text"]
    lorax = AsyncClient(gateway.url)
    tokens = [e.token.text async for e in lorax.generate_stream(prompt, adapter_id=adapter,
                                                                 max_new_tokens=NEW_TOKENS)]
    assert "".join(tokens) == direct
    oai = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0)
    stream = await oai.completions.create(model=adapter, prompt=prompt, temperature=0,
                                          max_tokens=NEW_TOKENS, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == direct
    # a job on an adapter the worker cannot find: the worker's own error, mapped
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="no-such-adapter", prompt=prompt, max_tokens=2)


def test_openai_without_max_tokens_runs_to_the_context_end(stack):
    """No max_tokens: as vLLM (max_tokens = context - prompt), not v1's 64 new tokens: the job ends
    at the model's context with `length` (EOS ignored, so the random weights cannot end it first).
    A long prompt (one token a byte) leaves ~110 tokens, so the run stays short on a CPU."""
    gateway, _ = stack
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=60)
    prompt = (PROMPTS["tenant-a"] + " ") * 24
    r = oai.completions.create(model="tenant-a", prompt=prompt[:400], temperature=0,
                               extra_body={"ignore_eos_token": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == CONTEXT and r.usage.completion_tokens > 64


def test_structured_output_through_both_clients(stack):
    """The text parses and validates against the schema whatever the random weights prefer."""
    gateway, _ = stack
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=60)
    for model in (BASE, "tenant-a"):
        r = oai.chat.completions.create(  # sampled (OpenAI's default temperature 1)
            model=model, max_tokens=80, seed=3, messages=[{"role": "user", "content": "Spam? Buy now!"}],
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), VERDICT)
    # any JSON object: greedy, since sampled random weights may wander in a string until max_tokens
    r = oai.chat.completions.create(model="tenant-b", max_tokens=120, temperature=0,
                                    response_format={"type": "json_object"},
                                    messages=[{"role": "user", "content": "Any JSON object"}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    lorax = Client(gateway.url, timeout=60)
    out = lorax.generate("Spam? Buy now!", adapter_id="tenant-b", max_new_tokens=80,
                         response_format={"type": "json_object", "schema": VERDICT})
    jsonschema.validate(json.loads(out.generated_text), VERDICT)
    with pytest.raises(openai.BadRequestError) as e:  # a schema the engine cannot enforce: the worker's error
        oai.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "strng"}}})
    assert e.value.body["param"] == "response_format"


def test_best_of_and_prompt_details_through_lorax_client(stack):
    gateway, _ = stack
    lorax = Client(gateway.url, timeout=60)
    prompt = PROMPTS["tenant-a"]
    r = lorax.generate(prompt, adapter_id="tenant-a", do_sample=True, best_of=2, max_new_tokens=NEW_TOKENS,
                       details=True, decoder_input_details=True)
    d = r.details
    [other] = d.best_of_sequences
    assert d.seed is not None and other.seed is not None and other.seed != d.seed
    assert len(d.prefill) == d.prompt_tokens and d.prefill[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.prefill[1:])
    assert len(other.prefill) == d.prompt_tokens and len(other.tokens) == other.generated_tokens

    def mean(tokens) -> float:
        return sum(t.logprob for t in tokens) / len(tokens)

    assert mean(d.tokens) >= mean(other.tokens)  # the most likely sequence is the answer
    r = lorax.generate(prompt, max_new_tokens=4, details=True, return_k_alternatives=3)
    for t in r.details.tokens:  # greedy: the token is its distribution's most likely
        assert len(t.alternative_tokens) == 3 and t.alternative_tokens[0].id == t.id
        assert [a.logprob for a in t.alternative_tokens] == sorted((a.logprob for a in t.alternative_tokens),
                                                                   reverse=True)


def test_openai_logprobs_n_and_seed(stack):
    gateway, _ = stack
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": PROMPTS[None]}]
    r = oai.chat.completions.create(model=BASE, messages=messages, temperature=0, max_tokens=6,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert math.exp(c.logprob) <= 1.0
    c = oai.completions.create(model="tenant-b", prompt=PROMPTS["tenant-b"], temperature=0, max_tokens=4,
                               logprobs=1, echo=True)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == c.usage.prompt_tokens + 4
    assert c.choices[0].text.startswith(PROMPTS["tenant-b"])
    # n choices, each its own job and seed: the same request gives the same choices again
    first, again = (oai.chat.completions.create(model="tenant-a", messages=messages, n=2, seed=7,
                                                temperature=1.0, max_tokens=NEW_TOKENS) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


async def test_openai_content_parts_reach_the_chat_template_intact(stack):
    """OpenAI content parts (and the developer role) through the SDK render the same prompt as the
    joined strings, and as the same parts published on the wire; an image part is refused by name."""
    gateway, topology = stack
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=60)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Once upon "}, {"type": "text", "text": "a time"}]}]
    joined = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]
    params = {"adapter_id": "tenant-a", "max_new_tokens": NEW_TOKENS}
    wire_parts = await amqp_result(topology, messages=parts, parameters=params)
    wire_joined = await amqp_result(topology, messages=joined, parameters=params)
    assert wire_parts["generated_text"] == wire_joined["generated_text"]
    assert wire_parts["details"]["prompt_tokens"] == wire_joined["details"]["prompt_tokens"]
    chat = await asyncio.to_thread(oai.chat.completions.create, model="tenant-a", messages=parts,
                                   temperature=0, max_tokens=NEW_TOKENS)
    assert chat.choices[0].message.content == wire_joined["generated_text"]
    assert chat.usage.prompt_tokens == wire_joined["details"]["prompt_tokens"]
    image = {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}
    with pytest.raises(openai.BadRequestError) as e:
        await asyncio.to_thread(oai.chat.completions.create, model=BASE, messages=[image], max_tokens=4)
    assert "messages[0].content" in e.value.body["message"] and "text" in e.value.body["message"]
