"""OpenAI's routes through the gateway, called with the `openai` SDK (sync and async); a fake-engine
worker process behind a real broker. The fake joins chat message contents with "|"."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.fake_engine import expected_text
from tests.gateway.conftest import ADAPTERS


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.fixture
def aclient(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=20)


def test_chat_completion_on_an_adapter(client):
    r = client.chat.completions.create(
        model="acme/support", temperature=0, max_tokens=60,
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hel"},
                                               {"type": "text", "text": "lo"}]}])
    text = expected_text("be brief|hello", "acme/support", 60)
    choice = r.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, "stop")
    assert r.model == "acme/support" and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len("be brief|hello"), len(text))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_base_model_by_name_or_empty_and_length_finish(client):
    for model in ("tiny-base", ""):
        r = client.chat.completions.create(model=model, max_tokens=4,
                                           messages=[{"role": "user", "content": "abc"}])
        assert r.choices[0].message.content == "<bas" and r.choices[0].finish_reason == "length"


def test_without_max_tokens_generation_runs_past_v1s_default(client):
    """No max_tokens: as OpenAI and vLLM, up to the end (here the fake's end of text, past v1's 64;
    at most the worker's --max-new-tokens and the context, tests/gateway/test_units.py)."""
    prompt = "tell me all about ships " * 5
    text = expected_text(prompt, "pirate", 4096)
    assert len(text) > 64
    r = client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": prompt}])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, "stop")
    assert r.usage.completion_tokens == len(text)
    chunks = list(client.completions.create(model="pirate", prompt=prompt, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "ahoy"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = expected_text("ahoy", "pirate")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_logprobs_stop_and_echo(client):
    r = client.completions.create(model="acme/sales", prompt="hello world", max_tokens=40, logprobs=0)
    text = expected_text("hello world", "acme/sales", 40)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and lp.tokens == list(text)
    assert lp.token_logprobs == [-0.5] * len(text) and lp.text_offset == list(range(len(text)))
    r = client.completions.create(model="tiny-base", prompt=["hello world"], stop="ow", max_tokens=40)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("<base>dlr", "stop")
    r = client.completions.create(model="tiny-base", prompt="abc", echo=True, max_tokens=40)
    assert r.choices[0].text == "abc" + expected_text("abc")


def test_completions_stream(client):
    chunks = list(client.completions.create(model="pirate", prompt="yo ho", stream=True,
                                            max_tokens=40))
    assert "".join(c.choices[0].text for c in chunks) == expected_text("yo ho", "pirate", 40)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="pirate", logprobs=True, max_tokens=3,
                                       messages=[{"role": "user", "content": "q"}])
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == list("<pi") and all(c.logprob == -0.5 for c in content)
    assert content[0].bytes == [ord("<")]


async def test_async_client_chat_and_stream(aclient):
    r = await aclient.chat.completions.create(model="acme/sales", temperature=0,
                                              messages=[{"role": "user", "content": "async"}])
    assert r.choices[0].message.content == expected_text("async", "acme/sales")
    stream = await aclient.chat.completions.create(model="acme/sales", stream=True,
                                                   messages=[{"role": "user", "content": "async"}])
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == expected_text("async", "acme/sales")


def test_models_list_the_base_model_and_the_adapter_root(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-base", *sorted(ADAPTERS)]
    assert client.models.retrieve("acme/sales").id == "acme/sales"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_unsupported_fields_are_refused_naming_them(client):
    messages = [{"role": "user", "content": "x"}]
    cases = [({"logit_bias": {"1": 2}}, "logit_bias"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="pirate", messages=messages, **extra)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
        assert "not supported" in e.value.body["message"]
    for extra, param in [({"n": 9}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"presence_penalty": 3.0}, "presence_penalty"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:  # out of range: the field named as sent
            client.chat.completions.create(model="pirate", messages=messages, **extra)
        assert e.value.body["param"] == param, e.value.body


def test_carried_fields_pass(client):
    """Fields the wire carries reach the worker (their effects on a real model: test_real_worker)."""
    messages = [{"role": "user", "content": "x"}]
    r = client.chat.completions.create(
        model="pirate", messages=messages, max_tokens=2, seed=5, presence_penalty=0.5,
        frequency_penalty=-0.5, logprobs=True, top_logprobs=3,
        response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}})
    assert r.choices[0].message.content == "<p" and len(r.choices[0].logprobs.content) == 2
    r = client.chat.completions.create(model="pirate", messages=messages, max_tokens=2,
                                       response_format={"type": "text"})
    assert r.choices[0].message.content == "<p"


def test_n_choices_are_jobs_of_their_own(client):
    r = client.chat.completions.create(model="pirate", n=3, max_tokens=40,
                                       messages=[{"role": "user", "content": "many"}])
    text = expected_text("many", "pirate", 40)
    assert [(c.index, c.message.content, c.finish_reason) for c in r.choices] == [(i, text, "stop") for i in range(3)]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len("many"), 3 * len(text))
    chunks = list(client.completions.create(model="tiny-base", prompt="two", n=2, stream=True, max_tokens=40,
                                            stream_options={"include_usage": True}))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == expected_text("two") and mine[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 2 * len(expected_text("two"))


def test_errors_map_to_openai_exceptions(client, gateway):
    user = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="temperature"):  # the wire's own check
        client.chat.completions.create(model="pirate", messages=user, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="role"):  # OpenAI's deprecated role: not on the wire
        client.chat.completions.create(model="pirate", messages=[{"role": "function", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as e:  # an adapter the worker cannot find
        client.chat.completions.create(model="missing", messages=user)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.InternalServerError) as e:  # retried by the worker, then answered
        client.chat.completions.create(model="flaky", messages=user)
    assert e.value.status_code == 500 and e.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError):  # before the first token: an HTTP error
        list(client.chat.completions.create(model="missing", messages=user, stream=True))
    resp = requests.post(f"{gateway.url}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"


def test_a_queue_that_refuses_jobs_is_a_rate_limit(full_gateway):
    client = openai.OpenAI(base_url=f"{full_gateway.url}/v1", api_key="-", max_retries=0, timeout=20)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "x"}])
    assert e.value.response.headers["x-should-retry"] == "true"
