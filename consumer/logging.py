"""structlog as JSON: one line per event on stderr, stdlib loggers (aio-pika, the engine's libraries)
routed through the same renderer so the stream stays machine-readable; `redact_url` keeps passwords
out of it, and an event field named like a credential (`api_token`, ...) is masked whatever it holds."""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

SECRET_FIELDS = frozenset({"api_token", "hf_token", "password", "authorization"})


def mask_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """A field that names a credential is logged as *** (a second line of defence: loraq logs
    none; this catches one passed by mistake)."""
    for key in SECRET_FIELDS & event.keys():
        event[key] = "***"
    return event


_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    mask_secrets,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def redact_url(url: str) -> str:
    """`url` without its password (amqp://user:***@host/), for logs and messages."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Idempotent. `level` applies to our events and to stdlib loggers alike."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    stream = stream or sys.stderr
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aio-pika logs every publish at debug and every reconnect attempt with a traceback at warning
    logging.getLogger("aio_pika").setLevel(max(numeric, logging.INFO))
    logging.getLogger("aiormq").setLevel(max(numeric, logging.INFO))
