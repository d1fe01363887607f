"""LoRAX's routes through the gateway, called with LoRAX's own client (lorax-client, sync and async)
and plain HTTP; a fake-engine worker process behind a real broker."""

from __future__ import annotations

import pytest
import requests
from lorax import AsyncClient, Client
from lorax.errors import GenerationError, OverloadedError, ShardTimeoutError, ValidationError

from consumer import protocol
from tests.fake_engine import expected_text
from tests.gateway.harness import GatewayThread, gateway_settings

# lorax-client 0.6.3 calls pydantic's deprecated .dict()
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")


def test_generate_as_lorax_client_sends_it(gateway):
    prompt = "hello world"
    r = Client(gateway.url).generate(prompt, adapter_id="acme/support", max_new_tokens=40)
    text = expected_text(prompt, "acme/support", 40)
    assert r.generated_text == text
    d = r.details
    assert (d.finish_reason, d.prompt_tokens, d.generated_tokens) == ("eos_token", len(prompt), len(text))
    assert "".join(t.text for t in d.tokens) == text
    assert [t.id for t in d.tokens] == [ord(c) for c in text]
    assert all(t.logprob == -0.5 and not t.special for t in d.tokens)
    assert d.prefill == []


def test_generate_route_answers_one_object_with_lorax_headers(gateway):
    resp = requests.post(f"{gateway.url}/generate", timeout=20,
                         json={"inputs": "abcdef", "parameters": {"max_new_tokens": 5}})
    assert resp.status_code == 200
    assert resp.json() == {"generated_text": expected_text("abcdef", None, 5)}  # no details asked
    h = resp.headers
    assert (h["x-model-id"], h["x-prompt-tokens"], h["x-generated-tokens"]) == ("tiny-base", "6", "5")
    assert "x-adapter-id" not in h and h["x-loraq-job-id"]
    # POST / answers a list of one, as LoRAX's router does for lorax-client
    resp = requests.post(gateway.url, timeout=20, json={"inputs": "abcdef", "parameters": {
        "max_new_tokens": 5, "adapter_id": "pirate", "details": True}})
    [body] = resp.json()
    assert body["generated_text"] == expected_text("abcdef", "pirate", 5)
    assert body["details"]["finish_reason"] == "length" and resp.headers["x-adapter-id"] == "pirate"


def test_stream_events_add_up_to_the_text_and_the_last_carries_it(gateway):
    prompt = "stream me"
    events = list(Client(gateway.url).generate_stream(prompt, adapter_id="acme/sales",
                                                       max_new_tokens=64))
    text = expected_text(prompt, "acme/sales", 64)
    assert "".join(e.token.text for e in events) == text
    assert len(events) == len(text)  # one event per token: the last token carries the result
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == text
    assert (events[-1].details.finish_reason, events[-1].details.generated_tokens) == ("eos_token", len(text))


def test_stream_route_raw_sse_frames(gateway):
    with requests.post(f"{gateway.url}/generate_stream", stream=True, timeout=20,
                       json={"inputs": "xy", "parameters": {"max_new_tokens": 3}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in resp.iter_lines() if line]
    assert all(f.startswith(b"data:{") for f in frames) and len(frames) == 3
    assert b'"generated_text":"<ba"' in frames[-1] and b'"generated_text":null' in frames[0]


async def test_async_client_generate_and_stream(gateway):
    client = AsyncClient(gateway.url)
    r = await client.generate("async one", adapter_id="pirate", max_new_tokens=30)
    assert r.generated_text == expected_text("async one", "pirate", 30)
    tokens = [e.token.text async for e in client.generate_stream("async two", max_new_tokens=30)]
    assert "".join(tokens) == expected_text("async two", None, 30)


def test_stop_sequences_and_return_full_text(gateway):
    client = Client(gateway.url)
    r = client.generate("hello world", stop_sequences=["ow"], max_new_tokens=40)
    assert r.generated_text == "<base>dlr" and r.details.finish_reason == "stop_sequence"
    r = client.generate("abc", return_full_text=True, max_new_tokens=40)
    assert r.generated_text == "abc" + expected_text("abc")


def test_lorax_fields_reach_the_worker(gateway):
    """Every LoRAX field is carried (LoRAX's own dialect on the wire): nothing refused on the way,
    the worker's answer as LoRAX shapes it. (Their effects: tests/gateway/test_real_worker.py.)"""
    r = Client(gateway.url).generate("zero", temperature=0.0, max_new_tokens=30, truncate=5,
                                     ignore_eos_token=True, return_k_alternatives=2, details=True)
    assert r.generated_text == expected_text("zero", None, 30)
    assert r.details.prefill == [] and r.details.best_of_sequences is None
    resp = requests.post(f"{gateway.url}/generate", timeout=20, json={"inputs": "abc", "parameters": {
        "max_new_tokens": 3, "frequency_penalty": 0.5, "presence_penalty": 0.5, "unknown_field": 1,
        "response_format": {"type": "json_object", "schema": {"type": "object"}}}})
    assert resp.status_code == 200 and resp.json() == {"generated_text": "<ba"}
    assert requests.get(f"{gateway.url}/info", timeout=5).json()["max_best_of"] == protocol.MAX_BEST_OF


def test_validation_errors_raise_lorax_validation_error(gateway):
    client = Client(gateway.url)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate("x", max_new_tokens=0)  # the wire's own check
    with pytest.raises(ValidationError, match="parameters.watermark is not supported"):
        client.generate("x", watermark=True)  # a LoRAX field loraq refuses: never dropped
    resp = requests.post(f"{gateway.url}/generate_stream", timeout=20, json={  # LoRAX's own check
        "inputs": "x", "parameters": {"decoder_input_details": True}})
    assert resp.status_code == 422 and "decoder_input_details" in resp.json()["error"]
    resp = requests.post(f"{gateway.url}/generate", timeout=20, json={
        "inputs": "x", "parameters": {"response_format": {"type": "yaml"}}})
    assert resp.status_code == 422 and "parameters.response_format.type" in resp.json()["error"]
    with pytest.raises(ValidationError, match="adapter_source"):
        client.generate("x", adapter_id="a", adapter_source="s3")
    resp = requests.post(f"{gateway.url}/generate", json={"inputs": ""}, timeout=20)
    assert resp.status_code == 422
    assert resp.json() == {"error": "Input validation error: `inputs` cannot be empty",
                           "error_type": "validation"}
    resp = requests.post(f"{gateway.url}/generate", data=b"{not json", timeout=20)
    assert resp.status_code == 422 and resp.json()["error_type"] == "validation"


def test_worker_errors_map_to_lorax_exceptions(gateway):
    client = Client(gateway.url)
    with pytest.raises(GenerationError, match="adapter_not_found|fake adapter_not_found"):
        client.generate("x", adapter_id="missing")  # LoRAX: adapter load failures are 424
    with pytest.raises(GenerationError, match="gave up after 2 deliveries"):  # retried by the worker first
        client.generate("x", adapter_id="flaky")
    with pytest.raises(GenerationError):  # before the first token: an HTTP error, not an event
        list(client.generate_stream("x", adapter_id="missing"))


def test_a_queue_that_refuses_jobs_is_overloaded(full_gateway):
    with pytest.raises(OverloadedError):
        Client(full_gateway.url).generate("x")
    resp = requests.post(f"{full_gateway.url}/generate", timeout=20, json={"inputs": "x"})
    assert resp.status_code == 429 and resp.json()["error_type"] == "overloaded"


def test_deadline_is_a_timeout(fake_topology, fake_worker):
    short = GatewayThread(gateway_settings(fake_topology, request_timeout_s=0.5))
    try:
        with pytest.raises(ShardTimeoutError):  # 504: the job did not finish within its deadline
            Client(short.url).generate("x", adapter_id="slow")
        assert short.inflight_jobs() == 0
    finally:
        short.stop()


def test_info_and_health(gateway):
    info = requests.get(f"{gateway.url}/info", timeout=5).json()
    assert info["model_id"] == "tiny-base" and info["model_pipeline_tag"] == "lorax"
    assert requests.get(f"{gateway.url}/health", timeout=5).status_code == 200
    assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
