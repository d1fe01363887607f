"""`parameters.response_format` on the wire (docs/protocol.md): LoRAX's shape, OpenAI's json_schema
shape, loraq's regex, and the JSON-type errors the protocol itself reports (whether a schema can be
enforced is the engine's to say: tests/engine/test_structured.py)."""

from __future__ import annotations

import json

import msgpack
import pytest

from consumer import protocol
from consumer.protocol import DEFAULT_JSON_SCHEMA, ProtocolError, parse_response_format
from engine.request import ResponseFormat

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def decoded(parameters: dict, content_type: str = protocol.JSON) -> protocol.Job:
    body = {"v": 1, "inputs": "hi", "parameters": parameters}
    raw = json.dumps(body).encode() if content_type == protocol.JSON else msgpack.packb(body)
    return protocol.decode_job(raw, content_type, None, "job-1", None, None, None, protocol.Limits())


@pytest.mark.parametrize("content_type", [protocol.JSON, protocol.MSGPACK])
def test_json_object_with_a_schema_keeps_its_property_order(content_type):
    job = decoded({"response_format": {"type": "json_object", "schema": SCHEMA}}, content_type)
    fmt = job.parameters.response_format
    assert fmt == ResponseFormat("json_schema", json.dumps(SCHEMA, separators=(",", ":")))
    assert list(json.loads(fmt.value)["properties"]) == ["b", "a"]  # generated in this order


def test_json_object_without_a_schema_is_loraxs_any_object():
    fmt = parse_response_format({"type": "json_object"})
    assert fmt is not None and json.loads(fmt.value) == DEFAULT_JSON_SCHEMA


def test_json_schema_reads_openais_shape_and_loraxs():
    openai = {"type": "json_schema", "json_schema": {"name": "thing", "strict": True, "schema": SCHEMA}}
    assert parse_response_format(openai) == ResponseFormat.json_schema(SCHEMA)
    assert parse_response_format({"type": "json_schema", "schema": SCHEMA}) == ResponseFormat.json_schema(SCHEMA)
    assert parse_response_format({"type": "json_schema"}) == ResponseFormat.json_schema(DEFAULT_JSON_SCHEMA)


def test_text_and_absent_leave_the_text_free():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert decoded({}).parameters.response_format is None


def test_regex():
    assert parse_response_format({"type": "regex", "pattern": "(yes|no)"}) == ResponseFormat("regex", "(yes|no)")


@pytest.mark.parametrize(("raw", "message"), [
    ("json", "parameters.response_format must be a map"),
    ({"schema": SCHEMA}, "parameters.response_format.type must be one of"),
    ({"type": "xml"}, "parameters.response_format.type must be one of"),
    ({"type": "json_object", "schema": "{}"}, "parameters.response_format.schema must be a map"),
    ({"type": "json_object", "schema": {"a": float("nan")}}, "parameters.response_format.schema is not JSON"),
    ({"type": "json_schema", "json_schema": "x"}, "parameters.response_format.json_schema must be a map"),
    ({"type": "text", "schema": SCHEMA}, "type text takes no schema"),
    ({"type": "regex"}, "parameters.response_format.pattern must be a non-empty string"),
    ({"type": "regex", "pattern": ""}, "parameters.response_format.pattern must be a non-empty string"),
])
def test_wrong_json_types_are_validation_errors(raw, message):
    with pytest.raises(ProtocolError) as raised:
        parse_response_format(raw)
    assert raised.value.error_type == protocol.VALIDATION and message in raised.value.message


def test_a_bad_response_format_fails_the_whole_job():
    with pytest.raises(ProtocolError, match="response_format.type"):
        decoded({"response_format": {"type": "yaml"}})


def test_client_side_job_body_accepts_it():
    body = protocol.job_body(inputs="hi", parameters={"response_format": {"type": "json_object", "schema": SCHEMA}})
    assert body["parameters"]["response_format"]["schema"] == SCHEMA
    assert "response_format" in protocol.PARAMETER_NAMES
