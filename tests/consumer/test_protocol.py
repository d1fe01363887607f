"""Wire protocol v1: decoding and validation of hostile jobs, reply builders. No broker, no torch."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import msgpack
import pytest

from consumer import protocol
from consumer.protocol import (
    JSON,
    MSGPACK,
    Limits,
    ProtocolError,
    Topology,
    decode_job,
    decode_reply,
    encode,
    encode_job,
)
from engine.request import SamplingParams, ScoredToken, Timings

LIMITS = Limits()


def job(body, content_type=MSGPACK, *, headers=None, message_id="m1", correlation_id="c1",
        reply_to="replies", expiration=None, limits=LIMITS, **kw):
    raw = body if isinstance(body, bytes) else encode(body, content_type)
    return decode_job(raw, content_type, headers, message_id, correlation_id, reply_to, expiration,
                      limits, **kw)


def error_of(*args, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        job(*args, **kw)
    return e.value


@pytest.mark.parametrize("ct", [MSGPACK, JSON, "application/json; charset=utf-8"])
def test_roundtrip_both_content_types(ct):
    raw = encode_job(inputs="hello", parameters={"adapter_id": "acme/bot", "max_new_tokens": 7,
                                                 "stop": ["\n\n"], "temperature": 0.7,
                                                 "do_sample": True, "seed": 3, "details": True},
                     stream=True, content_type=ct.split(";")[0])
    j = decode_job(raw, ct, None, "m1", "c1", "q", None, LIMITS)
    assert j.id == "m1" and j.correlation_id == "c1" and j.reply_to == "q"
    assert j.content_type == ct.split(";")[0]
    assert j.inputs == "hello" and j.messages is None and j.stream
    p, s = j.parameters, j.parameters.sampling
    assert (p.adapter_id, s.max_new_tokens, s.stop, s.temperature, s.do_sample, s.seed, p.details) \
        == ("acme/bot", 7, ("\n\n",), 0.7, True, 3, True)
    assert s.logprobs and isinstance(s.temperature, float)


def test_lorax_payload_without_v_and_with_unknown_fields():
    body = {"inputs": "hi", "parameters": {"adapter_id": "a", "best_of": 1, "watermark": False,
                                           "decoder_input_details": True},
            "some_future_field": {"x": 1}}
    j = job(body, JSON)
    assert j.inputs == "hi" and j.adapter_id == "a"


def test_defaults_and_empty_adapter_means_base():
    j = job({"v": 1, "inputs": "x", "parameters": {"adapter_id": "", "top_k": None}})
    p = j.parameters
    assert p.adapter_id is None and p.sampling == SamplingParams() and not p.details
    assert not p.return_full_text and not j.stream


def test_messages():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    j = job({"messages": msgs})
    assert j.inputs is None and list(j.messages) == msgs


def test_messages_content_parts_and_roles():
    """OpenAI's content parts: the text parts join in order; every role the wire knows passes (the
    chat template says which it renders: tests/engine/test_chat.py)."""
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
            {"role": "assistant", "content": []},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    for ct in (MSGPACK, JSON):
        j = job({"messages": msgs}, ct)
        assert j.messages == ({"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": ""}, {"role": "tool", "content": "42"})
    chars = [{"role": "user", "content": [{"type": "text", "text": "123456"}] * 2}]
    assert error_of({"messages": chars}, limits=Limits(max_prompt_chars=10)).error_type == protocol.PROMPT_TOO_LONG


@pytest.mark.parametrize("content,message", [
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}],
     "messages[1].content[1].type 'image_url' is not supported: only text parts are"),
    ([{"type": "input_audio", "input_audio": {}}], "messages[1].content[0].type 'input_audio' is not supported"),
    ([{"text": "untyped"}], "messages[1].content[0].type None is not supported"),
    ([{"type": "text", "text": None}], "messages[1].content[0].text must be a string"),
    (["a"], "messages[1].content[0] must be a map (a content part)"),
    ({"type": "text", "text": "a"}, "messages[1].content must be a string or a list of content parts"),
    (None, "messages[1].content must be a string or a list of content parts"),
])
def test_message_content_errors_name_the_part(content, message):
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": content}]}
    e = error_of(body)
    assert e.error_type == protocol.VALIDATION and e.message.startswith(message)


def test_job_id_fallbacks():
    body = encode({"inputs": "x"}, MSGPACK)
    assert decode_job(body, MSGPACK, None, None, "corr", None, None, LIMITS).id == "corr"
    a = decode_job(body, MSGPACK, None, None, None, "q", None, LIMITS).id
    b = decode_job(body, MSGPACK, None, None, None, "q", None, LIMITS).id
    assert a == b and a.startswith("sha256:")  # stable across redeliveries


BAD = [
    ("undecodable msgpack", b"\xc1\xc1\xc1", MSGPACK),
    ("truncated msgpack", msgpack.packb({"inputs": "hello"})[:-2], MSGPACK),
    ("invalid json", b"{not json", JSON),
    ("invalid utf-8", b'{"inputs": "\xff"}', JSON),
    ("lone surrogate", b'{"inputs": "\\ud800"}', JSON),
    ("not a map", [1, 2], MSGPACK),
    ("no content type", {"inputs": "x"}, None),
    ("unknown content type", b"inputs=x", "text/plain"),
    ("neither inputs nor messages", {"parameters": {}}, MSGPACK),
    ("both", {"inputs": "x", "messages": [{"role": "user", "content": "y"}]}, MSGPACK),
    ("inputs not a string", {"inputs": 5}, MSGPACK),
    ("empty inputs", {"inputs": ""}, MSGPACK),
    ("version 2", {"v": 2, "inputs": "x"}, MSGPACK),
    ("version string", {"v": "1", "inputs": "x"}, MSGPACK),
    ("parameters not a map", {"inputs": "x", "parameters": [1]}, MSGPACK),
    ("max_new_tokens string", {"inputs": "x", "parameters": {"max_new_tokens": "5"}}, JSON),
    ("max_new_tokens bool", {"inputs": "x", "parameters": {"max_new_tokens": True}}, JSON),
    ("max_new_tokens float", {"inputs": "x", "parameters": {"max_new_tokens": 5.5}}, JSON),
    ("max_new_tokens zero", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, MSGPACK),
    ("max_new_tokens over limit", {"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, MSGPACK),
    ("temperature negative", {"inputs": "x", "parameters": {"temperature": -0.5}}, MSGPACK),
    ("temperature nan", {"inputs": "x", "parameters": {"temperature": float("nan")}}, MSGPACK),
    ("temperature string", {"inputs": "x", "parameters": {"temperature": "hot"}}, MSGPACK),
    ("temperature infinite", {"inputs": "x", "parameters": {"temperature": float("inf")}}, MSGPACK),
    ("repetition_penalty nan", {"inputs": "x", "parameters": {"repetition_penalty": float("nan")}},
     MSGPACK),
    ("typical_p zero", {"inputs": "x", "parameters": {"typical_p": 0}}, MSGPACK),
    ("top_p > 1", {"inputs": "x", "parameters": {"top_p": 1.5}}, MSGPACK),
    ("top_k 0", {"inputs": "x", "parameters": {"top_k": 0}}, MSGPACK),
    ("do_sample int", {"inputs": "x", "parameters": {"do_sample": 1}}, MSGPACK),
    ("seed negative", {"inputs": "x", "parameters": {"seed": -1}}, MSGPACK),
    ("seed too big", {"inputs": "x", "parameters": {"seed": 2**64}}, JSON),
    ("stop a string", {"inputs": "x", "parameters": {"stop": "\n"}}, MSGPACK),
    ("stop with empty", {"inputs": "x", "parameters": {"stop": [""]}}, MSGPACK),
    ("stop with number", {"inputs": "x", "parameters": {"stop": [3]}}, MSGPACK),
    ("too many stops", {"inputs": "x", "parameters": {"stop": ["a"] * 9}}, MSGPACK),
    ("stop too long", {"inputs": "x", "parameters": {"stop": ["a" * 257]}}, MSGPACK),
    ("adapter_id number", {"inputs": "x", "parameters": {"adapter_id": 7}}, MSGPACK),
    ("adapter_id control char", {"inputs": "x", "parameters": {"adapter_id": "a\nb"}}, MSGPACK),
    ("adapter_source", {"inputs": "x", "parameters": {"adapter_source": "s3"}}, MSGPACK),
    ("stream string", {"inputs": "x", "stream": "yes"}, MSGPACK),
    ("messages empty", {"messages": []}, MSGPACK),
    ("messages not list", {"messages": "hi"}, MSGPACK),
    ("message not map", {"messages": ["hi"]}, MSGPACK),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, MSGPACK),
    ("content not string", {"messages": [{"role": "user", "content": ["hi"]}]}, MSGPACK),
    ("content number", {"messages": [{"role": "user", "content": 3}]}, MSGPACK),
    ("full text with messages", {"messages": [{"role": "user", "content": "hi"}],
                                 "parameters": {"return_full_text": True}}, MSGPACK),
]


@pytest.mark.parametrize("name,body,ct", BAD, ids=[b[0] for b in BAD])
def test_bad_jobs_are_validation_errors(name, body, ct):
    e = error_of(body, ct)
    assert e.error_type == protocol.VALIDATION and e.message and not e.retryable


@pytest.mark.parametrize("parameters,message", [
    ({"max_new_tokens": 0}, "parameters.max_new_tokens must be >= 1"),
    ({"max_new_tokens": 10**6}, "parameters.max_new_tokens must be in 1..4096"),
    ({"temperature": -1}, "parameters.temperature must be finite and >= 0 (0: greedy)"),
    ({"temperature": "hot"}, "parameters.temperature must be number, got str"),
    ({"top_k": 0}, "parameters.top_k must be >= 1"),
    ({"top_p": 1.5}, "parameters.top_p must be in (0, 1]"),
    ({"repetition_penalty": -1}, "parameters.repetition_penalty must be finite and > 0"),
    ({"stop": [""]}, "parameters.stop must be a list of non-empty strings"),
    ({"stop": ["a"] * 9}, "parameters.stop has more than 8 sequences"),
    ({"seed": -1}, "parameters.seed must be in 0..2**64-1"),
])
def test_parameter_errors_name_the_field(parameters, message):
    """Sampling values are checked once, by the engine's SamplingParams; the error names the field."""
    assert error_of({"inputs": "x", "parameters": parameters}).message == message


def test_sampling_params_check_their_values_themselves():
    with pytest.raises(ValueError, match=r"^temperature must be finite and >= 0 \(0: greedy\)$"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="^seed "):
        SamplingParams(seed=2**64)


def test_size_limits():
    small = Limits(max_body_bytes=100, max_prompt_chars=10)
    assert error_of({"inputs": "x" * 200}, limits=small).error_type == protocol.VALIDATION
    assert error_of({"inputs": "x" * 11}, limits=small).error_type == protocol.PROMPT_TOO_LONG
    msgs = [{"role": "user", "content": "123456"}] * 2
    assert error_of({"messages": msgs}, limits=small).error_type == protocol.PROMPT_TOO_LONG
    assert error_of({"inputs": "x"}, message_id="m" * 300).error_type == protocol.VALIDATION


def test_deadlines():
    now_ms = time.time() * 1000
    j = job({"inputs": "x"}, headers={"x-deadline-ms": int(now_ms) + 5000})
    assert not j.expired() and j.expired(now_ms + 6000)
    assert job({"inputs": "x"}, headers={"x-deadline-ms": 1}).expired()
    # expiration counts from receipt, tightened by the (whole-second) publish timestamp
    j = job({"inputs": "x"}, expiration="2000", received_ms=now_ms)
    assert j.deadline_ms == int(now_ms + 2000)
    old = datetime.fromtimestamp(now_ms / 1000 - 10, tz=UTC)
    assert job({"inputs": "x"}, expiration=2000, timestamp=old, received_ms=now_ms).expired()
    # both: the earlier wins
    j = job({"inputs": "x"}, headers={"x-deadline-ms": int(now_ms) + 100}, expiration="5000",
            received_ms=now_ms)
    assert j.deadline_ms == int(now_ms) + 100
    assert error_of({"inputs": "x"}, headers={"x-deadline-ms": "soon"}).error_type == "validation"
    assert error_of({"inputs": "x"}, expiration="later").error_type == "validation"


def test_api_token_not_in_repr():
    j = job({"inputs": "x", "parameters": {"adapter_id": "a", "api_token": "hf_secret"}})
    assert j.parameters.api_token == "hf_secret"
    assert "hf_secret" not in repr(j)


def test_encode_job_validates_locally():
    with pytest.raises(ProtocolError):
        encode_job(inputs="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(ProtocolError):
        encode_job(inputs="x", parameters={"max_new_tokens": "many"})
    body = msgpack.unpackb(encode_job(inputs="x", parameters={"top_k": None, "seed": 1}))
    assert body == {"v": 1, "inputs": "x", "parameters": {"seed": 1}}


RESULT = protocol.GenerationResult(
    id="j", generated_text="out", adapter_id="a", timings=Timings(1.23456, 0.0, 2.0, 3.0),
    details=protocol.Details(finish_reason="length", prompt_tokens=3, generated_tokens=2, seed=None))


def test_replies_on_the_wire():
    assert RESULT.to_wire() == {
        "v": 1, "id": "j", "generated_text": "out", "adapter_id": "a",
        "details": {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 2, "seed": None,
                    "skipped_tokens": 0, "prefill": [], "tokens": []},
        "timings": {"queue_ms": 1.235, "adapter_load_ms": 0.0, "ttft_ms": 2.0, "total_ms": 3.0}}
    t = protocol.TokenReply("j", protocol.Token(0, 5, "a", None))
    assert t.to_wire() == {"v": 1, "id": "j", "index": 0, "token": {"id": 5, "text": "a", "logprob": None,
                                                                   "special": False, "skipped": False}}
    e = protocol.ErrorReply(None, "nonsense", "boom")
    assert e.to_wire() == {"v": 1, "id": None, "error": "boom", "error_type": "internal", "retryable": False}


@pytest.mark.parametrize("ct", [MSGPACK, JSON])
def test_replies_round_trip(ct):
    detailed = dataclasses.replace(RESULT, timings=Timings(1.5, 0.0, 2.0, 3.0), details=dataclasses.replace(
        RESULT.details, tokens=(protocol.Token(0, 7, "o", -0.5), protocol.Token(1, 8, "ut", -1.0))))
    replies = [detailed, protocol.TokenReply("j", protocol.Token(3, 5, "a", -0.25)),
               protocol.ErrorReply("j", "overloaded", "busy", retryable=True)]
    for reply in replies:
        assert decode_reply(encode(reply.to_wire(), ct), ct, reply.KIND) == reply
    back = decode_reply(encode(RESULT.to_wire(), ct), ct, "result")
    assert back.timings.queue_ms == 1.235 and back.details.tokens == () and back.details.prefill == ()


def test_malformed_replies():
    with pytest.raises(ProtocolError, match="malformed result reply"):
        decode_reply(encode({"id": "j"}, JSON), JSON, protocol.REPLY_RESULT)
    with pytest.raises(ProtocolError, match="malformed token reply"):
        decode_reply(encode({"id": "j", "index": 0, "token": 5}, JSON), JSON, protocol.REPLY_TOKEN)
    with pytest.raises(ProtocolError, match="unknown reply type"):
        decode_reply(encode(RESULT.to_wire(), JSON), JSON, "weird")
    with pytest.raises(ProtocolError, match="must be a map"):
        decode_reply(encode([1], JSON), JSON, protocol.REPLY_ERROR)


def test_protocol_error_types_are_checked():
    with pytest.raises(ValueError, match="unknown error_type"):
        ProtocolError("nonsense", "boom")


def test_topology():
    t = Topology()
    assert (t.exchange, t.queue, t.routing_key, t.dlx, t.dead_queue, t.results_exchange,
            t.delivery_limit) == ("loraq", "loraq.generate", "generate", "loraq.dlx", "loraq.dead",
                                  "loraq.results", 5)
    assert t.result_routing_key(None) == "result.base"
    assert t.result_routing_key("acme/bot") == "result.acme/bot"
    p = Topology.prefixed("t1", delivery_limit=2)
    assert p.queue == "t1.loraq.generate" and p.routing_key == "generate" and p.delivery_limit == 2


def test_protocol_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, consumer.protocol; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_error_types_are_the_protocols() -> None:
    """The engine's ErrorType, which the wire's error_type strings come from, is protocol v1's list."""
    assert protocol.ERROR_TYPES == ("validation", "adapter_not_found", "adapter_invalid",
                                    "prompt_too_long", "deadline_exceeded", "overloaded", "internal")


# ---- LoRAX's generate parameters (issue 13; docs/lorax.md) -----------------------------------------

# router/src/lib.rs GenerateParameters, every field (`merged_adapters` is its adapter_parameters)
LORAX_FIELDS = ("adapter_id", "adapter_source", "merged_adapters", "api_token", "best_of", "temperature",
                "repetition_penalty", "frequency_penalty", "presence_penalty", "top_k", "top_p", "typical_p",
                "do_sample", "max_new_tokens", "ignore_eos_token", "return_full_text", "stop", "truncate",
                "watermark", "details", "decoder_input_details", "return_k_alternatives",
                "apply_chat_template", "seed", "response_format")
OWN_PARSERS = ("merged_adapters", "response_format")  # parsed by their own code (issue 13 points 2, 3)


def params_of(parameters: dict, **body) -> protocol.Parameters:
    return job({"inputs": "x", "parameters": parameters, **body}).parameters


def test_every_lorax_field_is_carried():
    assert set(LORAX_FIELDS) - set(OWN_PARSERS) <= set(protocol.PARAMETER_NAMES)


@pytest.mark.parametrize("v", [None, 1])
def test_temperature_zero_is_greedy(v):
    extra = {} if v is None else {"v": v}
    for parameters in ({"temperature": 0}, {"temperature": 0.0, "do_sample": True, "top_k": 5}):
        s = params_of(parameters, **extra).sampling
        assert s.temperature == 0.0 and s.greedy


@pytest.mark.parametrize("parameters,samples", [
    ({}, False), ({"temperature": 1.0}, False), ({"temperature": 0.7}, True), ({"top_k": 5}, True),
    ({"top_p": 0.9}, True), ({"top_p": 1.0}, False), ({"typical_p": 0.5}, True), ({"typical_p": 1.0}, False),
    ({"do_sample": True}, True), ({"do_sample": False, "temperature": 1.3}, True),
    ({"do_sample": True, "temperature": 0}, False), ({"repetition_penalty": 1.2}, False),
])
def test_lorax_sampling_rule_without_v(parameters, samples):
    """A body without `v` is LoRAX's: it samples whenever a warper is set (lorax_server tokens.py)."""
    assert params_of(parameters).sampling.greedy is not samples
    # v1 keeps its rule: do_sample alone switches sampling on (temperature 0 is greedy in both)
    assert params_of(parameters, v=1).sampling.greedy is not (
        bool(parameters.get("do_sample")) and parameters.get("temperature") != 0)


def test_max_new_tokens_default_per_dialect():
    assert params_of({}, v=1).sampling.max_new_tokens == 64
    # LoRAX: as many as the context allows; the worker's limit (the engine stops at the context's end)
    assert params_of({}).sampling.max_new_tokens == LIMITS.max_new_tokens
    assert params_of({"max_new_tokens": 5}).sampling.max_new_tokens == 5


def test_fill_context_gives_v1_the_lorax_default():
    """v1 `fill_context` (OpenAI's max_tokens unset): an absent max_new_tokens is the worker's limit,
    and nothing else of v1 changes (its sampling rule stays)."""
    small = Limits(max_new_tokens=100)
    filled = protocol.parse_parameters({"fill_context": True, "top_k": 5}, small)
    assert filled.sampling.max_new_tokens == 100 and filled.sampling.greedy  # v1: top_k alone is greedy
    assert params_of({"fill_context": True}, v=1).sampling.max_new_tokens == LIMITS.max_new_tokens
    assert params_of({"fill_context": False}, v=1).sampling.max_new_tokens == 64
    assert params_of({"fill_context": None}, v=1).sampling.max_new_tokens == 64
    assert params_of({"fill_context": True, "max_new_tokens": 7}, v=1).sampling.max_new_tokens == 7
    assert params_of({"fill_context": False}).sampling.max_new_tokens == LIMITS.max_new_tokens  # LoRAX's anyway
    e = error_of({"v": 1, "inputs": "x", "parameters": {"fill_context": True, "max_new_tokens": 101}},
                 limits=small)
    assert e.message == "parameters.max_new_tokens must be in 1..100"  # the limit still bounds a given one
    for body in ({"inputs": "x", "parameters": {"fill_context": 1}},
                 {"v": 1, "inputs": "x", "parameters": {"fill_context": "yes"}}):
        assert error_of(body).message == "parameters.fill_context must be bool, got " + \
            type(body["parameters"]["fill_context"]).__name__
    # what a client publishes carries it as it is
    assert protocol.job_body(inputs="x", parameters={"fill_context": True}) == \
        {"v": 1, "inputs": "x", "parameters": {"fill_context": True}}


def test_lorax_fields_map_onto_the_request():
    p = params_of({"truncate": 12, "ignore_eos_token": True, "decoder_input_details": True,
                   "return_k_alternatives": 3, "best_of": 2, "do_sample": True, "frequency_penalty": 0.5,
                   "presence_penalty": -1.5, "stop": ["\n"], "watermark": False, "return_full_text": True,
                   "apply_chat_template": False})
    s = p.sampling
    assert p.truncate == 12 and s.ignore_eos and s.prompt_logprobs and p.decoder_input_details
    assert s.logprobs and p.details  # LoRAX answers decoder_input_details with the whole details
    assert (s.return_k_alternatives, s.best_of, s.frequency_penalty, s.presence_penalty) == (3, 2, 0.5, -1.5)
    assert s.stop == ("\n",) and p.return_full_text and s.seed is None


@pytest.mark.parametrize("parameters,message", [
    ({"watermark": True}, "parameters.watermark is not supported"),
    ({"watermark": "yes"}, "parameters.watermark must be bool"),
    ({"truncate": 0}, "parameters.truncate must be >= 1"),
    ({"truncate": 1.5}, "parameters.truncate must be int"),
    ({"best_of": 2}, "parameters.best_of > 1 needs sampling"),
    ({"best_of": 2, "temperature": 0, "do_sample": True}, "parameters.best_of > 1 needs sampling"),
    ({"best_of": 2, "do_sample": True, "seed": 3}, "parameters.seed must not be set when best_of > 1"),
    ({"best_of": 0}, "parameters.best_of must be >= 1"),
    ({"best_of": protocol.MAX_BEST_OF + 1, "do_sample": True}, "parameters.best_of must be in 1.."),
    ({"frequency_penalty": 2.5}, "parameters.frequency_penalty must be in [-2, 2]"),
    ({"presence_penalty": -3}, "parameters.presence_penalty must be in [-2, 2]"),
    ({"return_k_alternatives": -1}, "parameters.return_k_alternatives must be >= 0"),
    ({"return_k_alternatives": protocol.MAX_K_ALTERNATIVES + 1}, "parameters.return_k_alternatives must be in"),
    ({"ignore_eos_token": 1}, "parameters.ignore_eos_token must be bool"),
    ({"decoder_input_details": "true"}, "parameters.decoder_input_details must be bool"),
    ({"adapter_source": "s3"}, "parameters.adapter_source must be one of"),
])
def test_lorax_field_errors_name_the_field(parameters, message):
    for body in ({"inputs": "x", "parameters": parameters}, {"v": 1, "inputs": "x", "parameters": parameters}):
        e = error_of(body)
        assert e.error_type == protocol.VALIDATION and e.message.startswith(message), e.message


def test_best_of_refused_with_stream():
    e = error_of({"inputs": "x", "stream": True, "parameters": {"best_of": 2, "do_sample": True}})
    assert e.message == "parameters.best_of > 1 is not supported with stream: true"


def test_apply_chat_template_reads_inputs_as_messages():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    import json as _json
    j = job({"inputs": _json.dumps(chat), "parameters": {"apply_chat_template": True}})
    assert j.inputs is None and list(j.messages) == chat
    for body, message in [
        ({"inputs": "not json", "parameters": {"apply_chat_template": True}}, "parameters.apply_chat_template: "),
        ({"inputs": '{"role": "user"}', "parameters": {"apply_chat_template": True}}, "messages must be"),
        ({"messages": chat, "parameters": {"apply_chat_template": True}}, "parameters.apply_chat_template needs"),
        ({"inputs": _json.dumps(chat), "parameters": {"apply_chat_template": True, "return_full_text": True}},
         "parameters.return_full_text needs inputs"),
    ]:
        assert error_of(body).message.startswith(message)


def test_result_reply_parses_with_lorax_client_types():
    """Every reply shape LoRAX's own client reads (lorax.types): tokens with special/skipped and
    alternatives, prefill with a null first logprob, skipped_tokens, best_of_sequences."""
    lorax_types = pytest.importorskip("lorax.types")
    alt = (ScoredToken(5, "a", -0.1), ScoredToken(6, "b", -2.0))
    tokens = (protocol.Token(0, 5, "a", -0.1, special=False, alternative_tokens=alt),
              protocol.Token(1, 2, "", -0.5, special=True))
    prefill = (ScoredToken(1, "<s>", None), ScoredToken(7, "x", -3.25))
    other = protocol.BestOfSequence("b", "length", 1, seed=9, prefill=prefill, tokens=tokens[:1])
    result = dataclasses.replace(RESULT, details=protocol.Details(
        finish_reason="eos_token", prompt_tokens=2, generated_tokens=2, seed=8, tokens=tokens,
        prefill=prefill, best_of_sequences=(other,)))
    for ct in (MSGPACK, JSON):
        wire = protocol.decode(encode(result.to_wire(), ct), ct)
        r = lorax_types.Response(**wire)
        d = r.details
        assert r.generated_text == "out" and d.finish_reason == "eos_token"
        assert wire["details"]["skipped_tokens"] == 0  # LoRAX's router has it; lorax-client 0.6 ignores it
        assert [t.special for t in d.tokens] == [False, True]
        assert not any(t["skipped"] for t in wire["details"]["tokens"])
        assert [a.id for a in d.tokens[0].alternative_tokens] == [5, 6] and d.tokens[1].alternative_tokens is None
        assert d.prefill[0].logprob is None and d.prefill[1].logprob == -3.25 and d.seed == 8
        assert d.best_of_sequences[0].generated_text == "b" and d.best_of_sequences[0].seed == 9
        assert decode_reply(encode(result.to_wire(), ct), ct, "result").details == result.details
    stream = protocol.TokenReply("j", tokens[0]).to_wire()["token"]
    assert lorax_types.Token(**stream).alternative_tokens[1].text == "b"


def test_docs_table_lists_every_lorax_field():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "lorax.md").read_text()
    table = docs.split("## Request: `parameters`", 1)[1].split("\n\n")[1]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert rows == list(LORAX_FIELDS)
