"""The worker's one frozen settings object. Every field is a `--flag` with a `LORAQ_<FIELD>` env twin:
command line > environment > default. No torch: `engine_config()` imports the engine's config lazily."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Sequence

from consumer.protocol import Limits, Topology

ENV_PREFIX = "LORAQ_"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class WorkerSettings:
    # broker
    amqp_url: str = _opt("amqp://guest:guest@127.0.0.1:5672/",
                         "AMQP URL; query options such as ?heartbeat=30&reconnect_interval=2 "
                         "(seconds) tune the connection")
    exchange: str = _opt(Topology.exchange, "jobs exchange (direct)")
    queue: str = _opt(Topology.queue, "jobs queue (quorum)")
    routing_key: str = _opt(Topology.routing_key, "routing key binding the jobs queue")
    dlx: str = _opt(Topology.dlx, "dead-letter exchange (fanout)")
    dead_queue: str = _opt(Topology.dead_queue, "dead-letter queue")
    results_exchange: str = _opt(Topology.results_exchange,
                                 "topic exchange for results of jobs without reply_to")
    affinity: bool = _opt(False, "adapter affinity: jobs with header x-adapter-id prefer the "
                                 "worker that already ran that adapter (needs the RabbitMQ plugin "
                                 "rabbitmq_consistent_hash_exchange; on every worker or none)")
    affinity_exchange: str = _opt(Topology.affinity_exchange,
                                  "with --affinity: consistent-hash exchange over the workers")
    affinity_fallback: str = _opt(Topology.affinity_fallback,
                                  "with --affinity: fanout back to the jobs queue")
    delivery_limit: int = _opt(Topology.delivery_limit,
                               "deliveries of a failing job before it is dead-lettered")
    prefetch: int = _opt(64, "unacked jobs held by this worker (>= max-batch): the intake bound")

    # batching
    max_batch: int = _opt(32, "running rows per engine step; also the largest collected group")
    batch_window_ms: float = _opt(5.0, "collection window before a group is submitted (while the engine is busy; "
                                   "a job that finds it idle is submitted at once)")

    # base model and engine
    model: str = _opt("embedded", "local HF dir, hub id, .gguf file, or 'embedded' (SmolLM2-135M)")
    gguf_file: str | None = _opt(None, "GGUF file name inside --model")
    revision: str | None = _opt(None, "hub revision of --model")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16")
    device: str = _opt("auto", "auto | cpu | cuda[:N]")
    max_batched_tokens: int = _opt(4096, "prompt tokens per prefill step")
    max_model_len: int | None = _opt(None, "context length (default: the model's, capped at 8192)")
    kv_cache_mb: int = _opt(512, "fixed KV cache budget in MiB")
    max_waiting: int = _opt(10_000, "engine queue bound; beyond it jobs get `overloaded`")
    lora_backend: str = _opt("torch", "batched LoRA op implementation")

    # adapters
    adapter_root: str | None = _opt(None, "directory of local adapters (ids are paths under it)")
    default_adapter_source: str = _opt("local", "local | hub, for jobs that do not say")
    hub_enabled: bool = _opt(False, "allow adapters from the Hugging Face hub")
    hub_allow_orgs: tuple[str, ...] = _opt((), "comma-separated hub orgs allowed (empty: any)")
    allow_pickle: bool = _opt(False, "allow adapter_model.bin (loaded with weights_only=True)")
    max_lora_rank: int = _opt(64, "largest adapter rank accepted")
    adapter_slots: int = _opt(32, "adapters resident on the device at once")
    adapter_host_mb: int = _opt(2048, "host RAM tier for adapters, MiB")
    adapter_disk_mb: int = _opt(20480, "disk tier for hub adapters, MiB")
    adapter_disk_dir: str | None = _opt(None, "disk tier directory (default ~/.cache/loraq/adapters)")

    # limits on hostile input
    max_body_bytes: int = _opt(Limits.max_body_bytes, "largest job body")
    max_prompt_chars: int = _opt(Limits.max_prompt_chars, "largest prompt (chars)")
    max_new_tokens: int = _opt(Limits.max_new_tokens, "largest max_new_tokens")
    max_stop_sequences: int = _opt(Limits.max_stop_sequences, "most stop sequences")
    max_stop_length: int = _opt(Limits.max_stop_length, "longest stop sequence (chars)")

    # reliability and operations
    result_cache_size: int = _opt(10_000, "finished jobs remembered to answer redeliveries")
    shutdown_grace_s: float = _opt(30.0, "on SIGTERM: time to finish in-flight jobs")
    metrics_port: int = _opt(9090, "Prometheus /metrics and /healthz port (0: off)")
    metrics_host: str = _opt("0.0.0.0", "address the metrics server binds")
    log_level: str = _opt("info", "debug | info | warning | error")

    def __post_init__(self) -> None:
        for name in ("prefetch", "max_batch", "result_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prefetch < self.max_batch:
            raise ValueError("prefetch must be >= max_batch (a batch needs that many jobs in hand)")
        if self.batch_window_ms < 0 or self.shutdown_grace_s < 0:
            raise ValueError("batch_window_ms and shutdown_grace_s must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")
        self.topology()
        self.limits()  # validate now, not at the first job

    def topology(self) -> Topology:
        return Topology(exchange=self.exchange, queue=self.queue, routing_key=self.routing_key,
                        dlx=self.dlx, dead_queue=self.dead_queue,
                        results_exchange=self.results_exchange,
                        affinity_exchange=self.affinity_exchange,
                        affinity_fallback=self.affinity_fallback,
                        delivery_limit=self.delivery_limit)

    def limits(self) -> Limits:
        return Limits(max_body_bytes=self.max_body_bytes, max_prompt_chars=self.max_prompt_chars,
                      max_new_tokens=self.max_new_tokens, max_stop_sequences=self.max_stop_sequences,
                      max_stop_length=self.max_stop_length)

    def engine_config(self):  # -> engine.config.EngineConfig
        from engine.config import EngineConfig

        extra = {} if self.adapter_disk_dir is None else {"adapter_disk_dir": self.adapter_disk_dir}
        return EngineConfig(
            model=self.model, gguf_file=self.gguf_file, revision=self.revision, dtype=self.dtype,
            device=self.device, max_batch=self.max_batch,
            max_batched_tokens=self.max_batched_tokens, max_model_len=self.max_model_len,
            kv_cache_bytes=self.kv_cache_mb * 2**20, max_new_tokens_limit=self.max_new_tokens,
            max_stop_sequences=self.max_stop_sequences, max_stop_length=self.max_stop_length,
            adapter_root=self.adapter_root, default_adapter_source=self.default_adapter_source,
            hub_enabled=self.hub_enabled, hub_allow_orgs=self.hub_allow_orgs,
            allow_pickle=self.allow_pickle, max_lora_rank=self.max_lora_rank,
            adapter_slots=self.adapter_slots, adapter_host_bytes=self.adapter_host_mb * 2**20,
            adapter_disk_bytes=self.adapter_disk_mb * 2**20, max_waiting=self.max_waiting,
            lora_backend=self.lora_backend, **extra,
        )

    def redacted_url(self) -> str:
        """amqp_url without its password, for logs."""
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", self.amqp_url)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: dict[str, str] | None = None) -> "WorkerSettings":
        """Parse `argv`; unset flags fall back to LORAQ_* variables of `env` (default os.environ)."""
        env = os.environ if env is None else env
        args = vars(build_parser().parse_args(argv))
        values: dict[str, Any] = {}
        for f in fields(cls):
            if args[f.name] is not None:
                values[f.name] = args[f.name]
            elif (raw := env.get(ENV_PREFIX + f.name.upper())) is not None:
                values[f.name] = _convert(f, raw)
        return cls(**values)


def _kind(f) -> str:
    return str(f.type).replace(" ", "")


def _convert(f, raw: str) -> Any:
    kind = _kind(f)
    try:
        if kind.startswith("bool"):
            if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind.startswith("tuple"):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if raw == "" and "None" in kind:
            return None
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return raw
    except ValueError:
        raise SystemExit(f"{ENV_PREFIX}{f.name.upper()}: cannot read {raw!r} as {kind}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraq worker",
        description="Serve LoRA adapters on one base model from RabbitMQ jobs (wire protocol v1). "
                    f"Every flag has an env twin {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}AMQP_URL).")
    for f in fields(WorkerSettings):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help = f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}, default {default!r}]"
        kind = _kind(f)
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(flag, default=None, help=help,
                                type=lambda raw, f=f: _convert(f, raw))
    return parser
