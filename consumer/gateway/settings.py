"""The gateway's one frozen settings object: every field a `--flag` with an env twin; command line >
environment > default. Names the gateway shares with the worker (broker, topology, model, adapter
root, log level) read the same `LORAQ_*` variables, so one environment configures both; the
gateway's own read `LORAQ_GATEWAY_*`. Bearer tokens come from the environment or a file only, never
a flag (a command line is visible to every user of the host)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from consumer.flags import Flag, add_flags, read_flags
from consumer.logging import redact_url
from consumer.protocol import Topology

SHARED = "LORAQ_"
OWN = "LORAQ_GATEWAY_"
TOKENS_ENV = OWN + "TOKENS"


def _opt(default: Any, help: str, env: str = OWN) -> Any:
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class GatewaySettings:
    # HTTP
    host: str = _opt("0.0.0.0", "address the HTTP server binds")
    port: int = _opt(8080, "HTTP port (0: any free port)")
    request_timeout_s: float = _opt(
        120.0, "seconds a request waits for its job; also the job's deadline (x-deadline-ms); a "
               "request that ends early (client gone) cancels its job")
    default_max_new_tokens: int | None = _opt(
        None, "max_new_tokens of requests that set none (LoRAX max_new_tokens, OpenAI max_tokens); "
              "default: as many as the worker's --max-new-tokens and the model's context allow, as "
              "LoRAX, OpenAI and vLLM do (OpenAI requests publish v1's fill_context)")
    stream_linger_ms: float = _opt(
        10.0, "LoRAX streams: how long a token waits for the job's final reply, so that the last "
             "token event carries generated_text and details as TGI's does (0: never wait)")
    max_body_bytes: int = _opt(2 << 20, "largest HTTP request body")
    tokens_file: str | None = _opt(
        None, f"file of bearer tokens, one per line (# comments); with it or {TOKENS_ENV} "
              "(comma-separated) set, every route but /health, /healthz and /metrics needs "
              "`Authorization: Bearer <token>`")

    # broker and topology (the worker's names)
    amqp_url: str = _opt("amqp://guest:guest@127.0.0.1:5672/",
                         "AMQP URL; query options such as ?reconnect_interval=2 tune the connection",
                         SHARED)
    exchange: str = _opt(Topology.exchange, "jobs exchange (direct)", SHARED)
    routing_key: str = _opt(Topology.routing_key, "routing key of jobs", SHARED)
    queue: str = _opt(Topology.queue, "jobs queue: /health reports whether a worker consumes it",
                      SHARED)

    # what /info, /v1/models and `model` name
    model: str = _opt("embedded", "the base model's name: /info's model_id, listed by /v1/models; "
                                  "OpenAI requests naming it (or \"\") run on the base model", SHARED)
    adapter_root: str | None = _opt(None, "directory of local adapters (the worker's): /v1/models "
                                          "lists the adapters under it", SHARED)
    log_level: str = _opt("info", "debug | info | warning | error", SHARED)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.stream_linger_ms < 0:
            raise ValueError("stream_linger_ms must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.default_max_new_tokens is not None and self.default_max_new_tokens < 1:
            raise ValueError("default_max_new_tokens must be >= 1")

    def topology(self) -> Topology:
        return Topology(exchange=self.exchange, routing_key=self.routing_key, queue=self.queue)

    def redacted_url(self) -> str:
        """amqp_url without its password, for logs."""
        return redact_url(self.amqp_url)

    def load_tokens(self, env: Mapping[str, str] | None = None) -> frozenset[str]:
        """Bearer tokens from TOKENS_ENV (comma-separated) and `tokens_file` (one per line, blank
        lines and # comments skipped). Empty: no authentication."""
        tokens = {t.strip() for t in (os.environ if env is None else env).get(TOKENS_ENV, "").split(",")}
        if self.tokens_file:
            for line in Path(self.tokens_file).read_text().splitlines():
                tokens.add(line.split("#", 1)[0].strip())
        return frozenset(t for t in tokens if t)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Parse `argv`; unset flags fall back to their env twins in `env` (default os.environ)."""
        return cls(**read_flags(build_parser().parse_args(argv), FLAGS, env))


# each field's env twin: its metadata's prefix (SHARED or OWN) + its name
FLAGS = tuple(Flag.of(f, f.metadata["env"] + f.name.upper(), f.metadata["help"])
              for f in fields(GatewaySettings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraq gateway",
        description="HTTP gateway: LoRAX's REST API and OpenAI's, each request a job on the queue. "
                    f"Bearer tokens: {TOKENS_ENV} (comma-separated) or --tokens-file.")
    return add_flags(parser, FLAGS)
