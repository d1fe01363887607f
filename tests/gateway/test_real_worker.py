"""Issue 14 end to end: a real worker process (`python -m consumer`) on a tiny random Llama with two
PEFT adapters, the gateway in front of it, and the real clients. Greedy text through lorax-client
and through the openai SDK equals the text of the same job published straight to the broker."""

from __future__ import annotations

import asyncio

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
PROMPTS = {None: "The quick brown fox", "tenant-a": "Once upon a time", "tenant-b": "Dear support team,"}


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
