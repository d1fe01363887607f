"""The two content types of the wire and the bytes <-> map conversion; the protocol's version."""

from __future__ import annotations

import json
from typing import Any

import msgpack

from consumer.protocol.errors import VALIDATION, ProtocolError

PROTOCOL_VERSION = 1

MSGPACK = "application/msgpack"
JSON = "application/json"
CONTENT_TYPES = (MSGPACK, JSON)


def normalize_content_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`; anything unknown is `validation`."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct not in CONTENT_TYPES:
        raise ProtocolError(VALIDATION, f"unsupported content_type {content_type!r}; "
                                        f"use {MSGPACK} or {JSON}")
    return ct


def encode(obj: Any, content_type: str) -> bytes:
    ct = normalize_content_type(content_type)
    if ct == MSGPACK:
        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def decode(body: bytes, content_type: str | None) -> Any:
    ct = normalize_content_type(content_type)
    try:
        if ct == MSGPACK:
            return msgpack.unpackb(body, raw=False)
        return json.loads(body.decode("utf-8"))
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as e:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and msgpack's ExtraData/FormatError
        raise ProtocolError(VALIDATION, f"body is not valid {ct}: {type(e).__name__}") from None
