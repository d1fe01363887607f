"""The gateway's pure parts, no broker: error mapping (checked against lorax-client's own parser),
what passes onto the wire, the response shapes (LoRAX's checked with lorax-client's own models),
settings, tokens, the adapter catalog, and the OpenAI request readers."""

from __future__ import annotations

import json

import pytest
from lorax import errors as lorax_errors
from lorax.types import Response as LoraxResponse

from consumer import protocol
from consumer.gateway import wire
from consumer.gateway.auth import BearerAuth
from consumer.gateway.catalog import Catalog
from consumer.gateway.errors import KINDS, OPENAI, GatewayError, field_of
from consumer.gateway.lorax_routes import generate_response
from consumer.gateway.openai_routes import (
    CHAT,
    COMPLETION,
    OpenAIRoutes,
    chat_logprob,
    chat_messages,
    choice_parameters,
    completion_logprobs,
    completion_prompt,
    finish_reason,
    openai_field,
    usage,
)
from consumer.gateway.settings import TOKENS_ENV, GatewaySettings
from engine.request import ScoredToken, Timings

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


def test_worker_error_names_its_field():
    e = GatewayError.from_reply(protocol.ErrorReply("j", protocol.VALIDATION, "parameters.top_k must be >= 1"))
    assert e.param == "top_k"
    assert [field_of(m) for m in ("parameters.response_format.schema is bad", "messages[2].role must be",
                                  "body is not valid JSON")] == ["response_format", "messages", None]
    assert [openai_field(p, k) for p, k in [("max_new_tokens", CHAT), ("return_k_alternatives", CHAT),
                                            ("return_k_alternatives", COMPLETION), ("seed", CHAT),
                                            (None, CHAT)]] == \
        ["max_tokens", "top_logprobs", "logprobs", "seed", None]


def test_job_parameters_pass_every_wire_field():
    lorax = {"max_new_tokens": 5, "temperature": 0, "stop": [], "seed": 3, "watermark": False,
             "best_of": 2, "truncate": 8, "decoder_input_details": True, "return_k_alternatives": 3,
             "ignore_eos_token": True, "frequency_penalty": 0.5, "presence_penalty": -0.5,
             "apply_chat_template": False, "merged_adapters": {"ids": ["a", "b"], "weights": [1, 1]},
             "response_format": {"type": "json_object"}, "top_p": None, "something_else": 1}
    got = wire.job_parameters(lorax)
    assert got == {k: v for k, v in lorax.items() if k not in ("top_p", "something_else")}
    assert set(got) <= set(protocol.PARAMETER_NAMES)


def test_lorax_requests_are_lorax_dialect_jobs():
    """No `v`: the worker applies LoRAX's defaults and sampling rule (temperature 0.7 samples)."""
    body = wire.lorax_job_body(inputs="x", parameters={"temperature": 0.7}, stream=False)
    assert body == {"inputs": "x", "parameters": {"temperature": 0.7}}
    _, _, params, _ = protocol.parse_body(body, protocol.Limits())
    assert params.sampling.do_sample and params.sampling.max_new_tokens == protocol.Limits().max_new_tokens
    with pytest.raises(GatewayError, match="best_of") as e:  # types and combinations checked before publishing
        wire.lorax_job_body(inputs="x", parameters={"best_of": 2, "do_sample": True}, stream=True)
    assert e.value.kind == "validation" and e.value.param == "best_of"


@pytest.mark.parametrize("kind,request_body", [
    (CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}]}),
    (COMPLETION, {"model": "base", "prompt": "hi", "n": 2}),
])
def test_openai_requests_without_max_tokens_fill_the_context(kind, request_body):
    """OpenAI's (and vLLM's) max_tokens unset: as many tokens as the worker allows, up to the
    context's end (v1 `fill_context`), not v1's 64; max_tokens and --default-max-new-tokens still
    count. The bodies are what the gateway publishes, read as the worker reads them."""
    limits = protocol.Limits(max_new_tokens=300)

    def published(settings: GatewaySettings, **fields) -> list[dict]:
        routes = OpenAIRoutes(None, settings, Catalog("base"))  # type: ignore[arg-type]  # _read needs no tracker
        return list(routes._read({**request_body, **fields}, kind).bodies)

    def read(body: dict) -> protocol.Parameters:
        return protocol.parse_body(body, limits)[2]

    for body in published(GatewaySettings()):
        assert body["v"] == 1 and body["parameters"]["fill_context"] is True
        assert "max_new_tokens" not in body["parameters"]
        params = read(body)
        assert params.sampling.max_new_tokens == limits.max_new_tokens
        assert params.sampling.do_sample  # still v1's OpenAI sampling, not LoRAX's rule
    for fields, settings, expected in [({"max_tokens": 5}, GatewaySettings(), 5),
                                       ({"max_completion_tokens": 6, "max_tokens": None}, GatewaySettings(), 6),
                                       ({"max_completion_tokens": None, "max_tokens": 7}, GatewaySettings(), 7),
                                       ({}, GatewaySettings(default_max_new_tokens=8), 8),
                                       ({"max_tokens": 9}, GatewaySettings(default_max_new_tokens=8), 9)]:
        for body in published(settings, **fields):
            assert "fill_context" not in body["parameters"] and read(body).sampling.max_new_tokens == expected


def result(text: str, tokens: tuple[protocol.Token, ...] = (), **details) -> protocol.GenerationResult:
    return protocol.GenerationResult("j", text, protocol.Details(
        finish_reason=details.pop("finish_reason", "length"), prompt_tokens=details.pop("prompt_tokens", 2),
        generated_tokens=len(tokens), tokens=tokens, **details), Timings(0.0, 0.0, 0.0, 0.0))


ALTS = (ScoredToken(7, "b", -0.1), ScoredToken(8, "c", -2.5))
TOKENS = (protocol.Token(0, 7, "b", -0.1, alternative_tokens=ALTS), protocol.Token(1, 2, "", -0.3, special=True))
PREFILL = (ScoredToken(1, "<s>", None), ScoredToken(5, "a", -4.0), ScoredToken(6, "z", -1.0))


def test_lorax_response_carries_prefill_alternatives_and_best_of():
    other = protocol.BestOfSequence("q", "eos_token", 1, seed=9, prefill=PREFILL, tokens=TOKENS[:1])
    body = generate_response(result("b", TOKENS, seed=4, prefill=PREFILL, best_of_sequences=(other,)), True)
    r = LoraxResponse(**body)  # lorax-client's own model parses it
    d = r.details
    assert [(t.id, t.text, t.logprob) for t in d.prefill] == [(1, "<s>", None), (5, "a", -4.0), (6, "z", -1.0)]
    assert [(a.id, a.logprob) for a in d.tokens[0].alternative_tokens] == [(7, -0.1), (8, -2.5)]
    assert d.tokens[1].special and d.tokens[1].alternative_tokens is None and d.seed == 4
    assert body["details"]["skipped_tokens"] == 0
    [b] = d.best_of_sequences
    assert (b.generated_text, b.seed, len(b.prefill), b.tokens[0].text) == ("q", 9, 3, "b")
    assert generate_response(result("b", TOKENS), False) == {"generated_text": "b"}
    assert "best_of_sequences" not in generate_response(result("b", TOKENS), True)["details"]


def test_openai_logprobs_shapes():
    lp = chat_logprob(TOKENS[0], 1)
    assert lp == {"token": "b", "logprob": -0.1, "bytes": [98],
                  "top_logprobs": [{"token": "b", "logprob": -0.1, "bytes": [98]}]}
    # completions with echo: the prompt's tokens first (the BOS is not in the prompt's text)
    out = completion_logprobs(TOKENS, 2, echo="az", prefill=PREFILL)
    assert out["tokens"] == ["<s>", "a", "z", "b", ""]
    assert out["token_logprobs"] == [None, -4.0, -1.0, -0.1, -0.3]
    assert out["text_offset"] == [0, 0, 1, 2, 3]
    assert out["top_logprobs"] == [None, {}, {}, {"b": -0.1, "c": -2.5}, {}]  # null first, as OpenAI
    assert completion_logprobs(TOKENS, 0)["top_logprobs"] is None
    assert usage([result("a", TOKENS), result("b", TOKENS[:1])]) == \
        {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_n_choices_get_their_own_seeds():
    params = {"seed": 2**64 - 1, "temperature": 0.5}
    assert [choice_parameters(params, i, 3)["seed"] for i in range(3)] == [2**64 - 1, 0, 1]
    assert choice_parameters(params, 0, 1) is params
    assert choice_parameters({"seed": None}, 1, 2) == {"seed": None}


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
    assert [finish_reason(r) for r in ("eos_token", "stop_sequence", "length", None)] == \
        ["stop", "stop", "length", None]


def test_unstreamed_text():
    assert wire.unstreamed("abc", "abc") == ""
    assert wire.unstreamed("abc", "") == "abc"   # answered from a result cache: nothing streamed
    assert wire.unstreamed("abc", "ab") == "c"
    assert wire.unstreamed("abc", "xyz") == ""
