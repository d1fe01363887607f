"""The worker's settings: one frozen object holding its groups (the broker topology, the limits on
hostile input, the engine's flags) beside the worker's own values.

Every leaf value is a `--flag` with a `LORAQ_<FLAG>` env twin, command line > environment >
default. `FLAGS` lists them in `--help` order with the group each fills, from the `HELP` table
(which the README's Configuration table mirrors). No torch: `engine_config()` imports the engine's
config (itself torch-free) only when called.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from consumer.flags import Flag, add_flags, read_flags
from consumer.logging import redact_url
from consumer.protocol import Limits, Topology
from consumer.settlement import Backoff

if TYPE_CHECKING:
    from engine.config import EngineConfig

ENV_PREFIX = "LORAQ_"
MIB = 2**20


@dataclass(frozen=True)
class EngineSettings:
    """The engine's flags, in the units an operator types (MiB). Names are EngineConfig's, but
    for the *_mb budgets (`WorkerSettings.engine_config()` converts them)."""

    model: str = "embedded"
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_batched_tokens: int = 4096
    max_model_len: int | None = None
    kv_cache_mb: int = 512
    max_waiting: int = 10_000
    lora_backend: str = "auto"
    pack_weights: bool = True
    adapter_root: str | None = None
    default_adapter_source: str = "local"
    hub_enabled: bool = False
    hub_allow_orgs: tuple[str, ...] = ()
    hub_worker_credentials: bool = False
    allow_pickle: bool = False
    max_lora_rank: int = 64
    adapter_slots: int = 32
    adapter_host_mb: int = 2048
    adapter_disk_mb: int = 20480
    adapter_disk_dir: str | None = None  # None: the engine's default


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    topology: Topology = field(default_factory=Topology)
    affinity: bool = False
    prefetch: int = 64
    max_batch: int = 32  # the collector's largest group and the engine's running rows
    batch_window_ms: float = 5.0
    engine: EngineSettings = field(default_factory=EngineSettings)
    limits: Limits = field(default_factory=Limits)
    result_cache_size: int = 10_000
    retry_delay_s: float = 1.0
    retry_max_delay_s: float = 30.0
    shutdown_grace_s: float = 30.0
    engine_stall_s: float = 30.0
    metrics_port: int = 9090
    metrics_host: str = "0.0.0.0"
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("prefetch", "max_batch", "result_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prefetch < self.max_batch:
            raise ValueError("prefetch must be >= max_batch (a batch needs that many jobs in hand)")
        if self.batch_window_ms < 0 or self.shutdown_grace_s < 0:
            raise ValueError("batch_window_ms and shutdown_grace_s must be >= 0")
        if self.engine_stall_s <= 0:
            raise ValueError("engine_stall_s must be > 0")
        Backoff(self.retry_delay_s, self.retry_max_delay_s)  # raises on bad retry delays
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")

    def engine_config(self) -> EngineConfig:
        from engine.config import EngineConfig

        same = {k: v for k, v in asdict(self.engine).items() if not k.endswith("_mb")}
        if same["adapter_disk_dir"] is None:
            del same["adapter_disk_dir"]  # the engine's default
        e, lim = self.engine, self.limits
        return EngineConfig(
            **same, max_batch=self.max_batch, kv_cache_bytes=e.kv_cache_mb * MIB,
            adapter_host_bytes=e.adapter_host_mb * MIB, adapter_disk_bytes=e.adapter_disk_mb * MIB,
            max_new_tokens_limit=lim.max_new_tokens, max_stop_sequences=lim.max_stop_sequences,
            max_stop_length=lim.max_stop_length)

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.retry_delay_s, self.retry_max_delay_s)

    def redacted_url(self) -> str:
        """amqp_url (one or several comma-separated) without passwords, for logs."""
        return redact_url(self.amqp_url)

    @classmethod
    def from_flags(cls, **values: Any) -> WorkerSettings:
        """One keyword per flag (`max_batch=8`, `exchange="x"`, `kv_cache_mb=64`), each put into
        its group; the rest keep their defaults."""
        unknown = set(values) - set(FLAGS_BY_NAME)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for name, value in values.items():
            group = FLAGS_BY_NAME[name].group
            (top if group is None else groups[group])[name] = value
        built: dict[str, Any] = {name: GROUPS[name](**kw) for name, kw in groups.items()}
        return cls(**top, **built)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Parse `argv`; unset flags fall back to LORAQ_* variables of `env` (default os.environ)."""
        return cls.from_flags(**read_flags(build_parser().parse_args(argv), FLAGS, env))

    def to_args(self, skip: Collection[str] = ()) -> list[str]:
        """The flags of every value that differs from its default (but those named in `skip`):
        `from_args(s.to_args(), env={}) == s`. For a worker started as a child process."""
        args: list[str] = []
        for flag in FLAGS:
            value = flag.value(self)
            if flag.name in skip or value == flag.default:
                continue
            if isinstance(value, bool):
                args.append(flag.option if value else "--no-" + flag.option[2:])
            elif isinstance(value, tuple):
                args += [flag.option, ",".join(value)]
            else:
                args += [flag.option, "" if value is None else str(value)]
        return args


GROUPS: dict[str, type[Topology] | type[Limits] | type[EngineSettings]] = {
    "topology": Topology, "limits": Limits, "engine": EngineSettings}

# flag -> help, in --help order. Each names a field of WorkerSettings or of one of its GROUPS.
HELP = {
    # broker
    "amqp_url": "AMQP URL, or the comma-separated URLs of a cluster's nodes (tried in turn on every "
                "reconnect); query options of the first such as ?heartbeat=30&reconnect_interval=2 "
                "(seconds) tune the connection",
    "exchange": "jobs exchange (direct)",
    "queue": "jobs queue (quorum)",
    "routing_key": "routing key binding the jobs queue",
    "dlx": "dead-letter exchange (fanout)",
    "dead_queue": "dead-letter queue (bound it with a broker policy: README, Reliability)",
    "results_exchange": "topic exchange for results of jobs without reply_to",
    "retry_queue": "quorum queue where failed jobs wait out their retry delay",
    "cancel_exchange": "fanout exchange of cancel messages; each worker binds a queue of its own "
                       "('': the jobs exchange's name + '.cancel')",
    "affinity": "adapter affinity: jobs with header x-adapter-id prefer the worker that already ran "
                "that adapter (needs the RabbitMQ plugin rabbitmq_consistent_hash_exchange; on every "
                "worker or none)",
    "affinity_exchange": "with --affinity: consistent-hash exchange over the workers",
    "affinity_fallback": "with --affinity: fanout back to the jobs queue",
    "delivery_limit": "retries of a failing job before it is dead-lettered (it runs this + 1 times)",
    "prefetch": "unacked jobs held by this worker (>= max-batch): the intake bound",
    # batching
    "max_batch": "running rows per engine step; also the largest collected group",
    "batch_window_ms": "collection window before a group is submitted (while the engine is busy; "
                       "a job that finds it idle is submitted at once)",
    # base model and engine
    "model": "local HF dir, hub id, .gguf file, or 'embedded' (SmolLM2-135M)",
    "gguf_file": "GGUF file name inside --model",
    "revision": "hub revision of --model",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda[:N]",
    "max_batched_tokens": "tokens per engine step: one per decoding row, the rest for prompt chunks",
    "max_model_len": "context length (default: the model's, capped at 8192)",
    "kv_cache_mb": "fixed KV cache budget in MiB",
    "max_waiting": "engine queue bound; beyond it jobs get `overloaded`",
    "lora_backend": "auto | torch | triton: batched LoRA op (auto: Triton SGMV kernels on CUDA when triton "
                    "is installed, else torch)",
    "pack_weights": "on CPU in fp32, run the model's GEMMs on oneDNN-packed copies of its weights: faster, "
                    "for a second copy of them in RAM",
    # adapters
    "adapter_root": "directory of local adapters (ids are paths under it)",
    "default_adapter_source": "local | hub, for jobs that do not say",
    "hub_enabled": "allow adapters from the Hugging Face hub",
    "hub_allow_orgs": "comma-separated hub orgs allowed (empty: any)",
    "hub_worker_credentials": "hub jobs without api_token use the worker's own hub login (HF_TOKEN); "
                              "off: they get public adapters only",
    "allow_pickle": "allow adapter_model.bin (loaded with weights_only=True)",
    "max_lora_rank": "largest adapter rank accepted",
    "adapter_slots": "adapters resident on the device at once",
    "adapter_host_mb": "host RAM tier for adapters, MiB",
    "adapter_disk_mb": "disk tier for hub adapters, MiB",
    "adapter_disk_dir": "disk tier directory (default ~/.cache/loraq/adapters)",
    # limits on hostile input
    "max_body_bytes": "largest job body",
    "max_prompt_chars": "largest prompt (chars)",
    "max_new_tokens": "largest max_new_tokens",
    "max_stop_sequences": "most stop sequences",
    "max_stop_length": "longest stop sequence (chars)",
    # reliability and operations
    "result_cache_size": "finished jobs remembered to answer redeliveries",
    "retry_delay_s": "delay before the first retry of a failed job; each next one doubles",
    "retry_max_delay_s": "longest delay between retries",
    "shutdown_grace_s": "on SIGTERM: the process exits within this (in-flight jobs finish or go back "
                        "to the queue, the engine stops)",
    "engine_stall_s": "readiness: the engine's step loop went round within this many seconds",
    "metrics_port": "Prometheus /metrics, /livez, /readyz (= /healthz) port (0: off)",
    "metrics_host": "address the metrics server binds",
    "log_level": "debug | info | warning | error",
}


def _flags() -> tuple[Flag, ...]:
    where: dict[str, tuple[str | None, Field[Any]]] = {}
    for group, cls in (None, WorkerSettings), *GROUPS.items():
        for f in fields(cls):
            if f.name in GROUPS and cls is WorkerSettings:
                continue
            if f.name in where:
                raise TypeError(f"setting {f.name!r} is in two groups")
            where[f.name] = (group, f)
    flags = []
    for name, help in HELP.items():
        group, f = where[name]
        flags.append(Flag.of(f, ENV_PREFIX + name.upper(), help, group))
    return tuple(flags)


FLAGS = _flags()
FLAGS_BY_NAME = {flag.name: flag for flag in FLAGS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraq worker",
        description="Serve LoRA adapters on one base model from RabbitMQ jobs (wire protocol v1). "
                    f"Every flag has an env twin {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}AMQP_URL).")
    return add_flags(parser, FLAGS)
