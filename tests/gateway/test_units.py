"""The gateway's pure parts, no broker: error mapping (checked against lorax-client's own parser),
what passes onto the wire, LoRAX's sampling rule, settings, tokens, the adapter catalog, and the
OpenAI request readers."""

from __future__ import annotations

import json

import pytest
from lorax import errors as lorax_errors

from consumer import protocol
from consumer.gateway import wire
from consumer.gateway.auth import BearerAuth
from consumer.gateway.catalog import Catalog
from consumer.gateway.errors import KINDS, OPENAI, GatewayError
from consumer.gateway.lorax_routes import LoraxRoutes
from consumer.gateway.openai_routes import chat_messages, completion_prompt, finish_reason, response_format
from consumer.gateway.settings import TOKENS_ENV, GatewaySettings

LORAX_EXCEPTION = {
    "validation": lorax_errors.ValidationError, "prompt_too_long": lorax_errors.ValidationError,
    "adapter_not_found": lorax_errors.GenerationError, "adapter_invalid": lorax_errors.GenerationError,
    "internal": lorax_errors.GenerationError, "overloaded": lorax_errors.OverloadedError,
    "deadline_exceeded": lorax_errors.ShardTimeoutError, "unavailable": lorax_errors.UnknownError,
    "unauthorized": lorax_errors.UnknownError, "too_large": lorax_errors.ValidationError,
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_raises_its_lorax_exception(kind):
    e = GatewayError(kind, "boom")
    raised = lorax_errors.parse_error(e.status(openai=False), e.lorax_body())
    assert type(raised) is LORAX_EXCEPTION[kind] and "boom" in str(raised)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_openai_shape(kind):
    e = GatewayError(kind, "boom", param="p")
    body = e.openai_body()["error"]
    assert body["message"] == "boom" and body["param"] == "p" and body["type"] == OPENAI[kind][1]
    assert e.response(openai=True).status == e.status(openai=True) == OPENAI[kind][0]


def test_worker_error_reply_keeps_its_kind():
    e = GatewayError.from_reply(protocol.ErrorReply("j", protocol.ADAPTER_NOT_FOUND, "no such"))
    assert (e.kind, e.status(False), e.status(True), e.retryable) == ("adapter_not_found", 424, 404, False)
    assert GatewayError.from_reply(protocol.ErrorReply("j", protocol.OVERLOADED, "full")).retryable


def test_job_parameters_pass_the_wire_and_refuse_what_it_lacks():
    got = wire.job_parameters({"max_new_tokens": 5, "temperature": None, "stop": [], "seed": 3,
                               "watermark": False, "best_of": 1, "truncate": None,
                               "something_else": 1})
    assert got == {"max_new_tokens": 5, "stop": [], "seed": 3}
    for name, value in [("truncate", 8), ("best_of", 2), ("watermark", True),
                        ("merged_adapters", {"ids": ["a"]}), ("frequency_penalty", 0.5),
                        ("response_format", {"type": "json_object"}), ("ignore_eos_token", True)]:
        with pytest.raises(GatewayError, match=f"parameters.{name} is not supported") as e:
            wire.job_parameters({name: value})
        assert e.value.kind == "validation" and e.value.param == name


@pytest.mark.parametrize("params, do_sample, temperature", [
    ({}, False, None),                                   # greedy by default
    ({"temperature": 1.0}, False, 1.0),                  # 1 warps nothing
    ({"temperature": 0.7}, True, 0.7),                   # a warper turns sampling on
    ({"top_k": 5}, True, None), ({"top_p": 0.9}, True, None), ({"typical_p": 0.5}, True, None),
    ({"top_p": 1.0}, False, None),
    ({"do_sample": True}, True, None),
    ({"do_sample": True, "temperature": 0}, False, None),  # temperature 0 is greedy
    ({"temperature": 0.0, "top_k": 5}, False, None),
])
def test_lorax_sampling_rule(params, do_sample, temperature):
    out = LoraxRoutes._sampling(params)
    assert (out["do_sample"], out.get("temperature")) == (do_sample, temperature)


def test_settings_flags_env_and_tokens(tmp_path):
    env = {"LORAQ_AMQP_URL": "amqp://u:p@broker:5672/", "LORAQ_MODEL": "m",
           "LORAQ_GATEWAY_PORT": "9000", "LORAQ_GATEWAY_DEFAULT_MAX_NEW_TOKENS": "",
           TOKENS_ENV: " a , b,"}
    s = GatewaySettings.from_args(["--port", "8000", "--request-timeout-s", "2.5"], env)
    assert (s.port, s.amqp_url, s.model, s.request_timeout_s) == (8000, "amqp://u:p@broker:5672/", "m", 2.5)
    assert s.default_max_new_tokens is None and s.redacted_url() == "amqp://u:***@broker:5672/"
    assert GatewaySettings.from_args([], env).port == 9000
    tokens = tmp_path / "tokens"
    tokens.write_text("# ops\nc\n\nd  # ci\n")
    assert GatewaySettings(tokens_file=str(tokens)).load_tokens(env) == {"a", "b", "c", "d"}
    assert GatewaySettings().load_tokens({}) == frozenset()
    with pytest.raises(ValueError, match="request_timeout_s"):
        GatewaySettings(request_timeout_s=0)


def test_bearer_auth():
    assert BearerAuth(frozenset()).allows(None)
    auth = BearerAuth(frozenset({"t1", "t2"}))
    assert auth.allows("Bearer t2") and auth.allows("bearer t1")
    assert not any(auth.allows(h) for h in (None, "", "Bearer", "Bearer t3", "Basic t1", "t1"))


def test_catalog_lists_adapters_under_the_root(tmp_path):
    for name in ("b", "org/a", "org/a/checkpoint", ".hidden/x"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({}))
    (tmp_path / "empty").mkdir()
    catalog = Catalog("base", str(tmp_path))
    assert catalog.adapters() == ["b", "org/a"]
    assert Catalog("base", str(tmp_path / "nowhere")).adapters() == []
    assert [catalog.adapter_id(m) for m in ("base", "", None, "org/a")] == [None, None, None, "org/a"]


def test_openai_readers():
    assert chat_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": None}]) == [
        {"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]
    with pytest.raises(GatewayError, match="only text parts"):
        chat_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(GatewayError):
        chat_messages([])
    assert completion_prompt(["one"]) == "one"
    with pytest.raises(GatewayError, match="one prompt"):
        completion_prompt(["one", "two"])
    assert response_format({"type": "text"}) is None
    assert response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}) \
        == {"type": "json_schema", "schema": {"type": "object"}}
    assert response_format({"type": "json_object"}) == {"type": "json_object", "schema": None}
    assert [finish_reason(r) for r in ("eos_token", "stop_sequence", "length", None)] == \
        ["stop", "stop", "length", None]


def test_unstreamed_text():
    assert wire.unstreamed("abc", "abc") == ""
    assert wire.unstreamed("abc", "") == "abc"   # answered from a result cache: nothing streamed
    assert wire.unstreamed("abc", "ab") == "c"
    assert wire.unstreamed("abc", "xyz") == ""
