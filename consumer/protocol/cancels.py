"""A cancel message (docs/protocol.md, "Cancel") names one job: body {"v": 1, "id": <job id>}, in either
content type, published to the cancel exchange. Its message_id is the job id too."""

from __future__ import annotations

from typing import Any

from consumer.protocol.codec import MSGPACK, PROTOCOL_VERSION, decode, encode
from consumer.protocol.errors import ProtocolError, _fail
from consumer.protocol.limits import Limits


def encode_cancel(job_id: str, content_type: str = MSGPACK) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": job_id}, content_type)


def decode_cancel(body: bytes, content_type: str | None, message_id: str | None, limits: Limits) -> str:
    """The job id a cancel message names: its body's `id`, else its `message_id`. Raises
    ProtocolError (validation) when it names none, or one longer than the id limit."""
    job_id: Any = None
    if len(body) <= limits.max_body_bytes:
        try:
            decoded = decode(body, content_type)
        except ProtocolError:
            decoded = None
        if isinstance(decoded, dict):
            job_id = decoded.get("id")
    if job_id is None:
        job_id = message_id
    if not isinstance(job_id, str) or not job_id:
        raise _fail("a cancel message names its job in body.id or message_id")
    if len(job_id) > limits.max_id_length:
        raise _fail(f"cancelled job id longer than {limits.max_id_length}")
    return job_id
