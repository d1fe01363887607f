"""One PEFT LoRA adapter read from disk, validated against the base model, laid out for the op.

PEFT stores `lora_A.weight` [r, in] and `lora_B.weight` [out, r] and computes
`y += scale * (x @ A.T) @ B.T` with `scale = alpha / r` (or `alpha / sqrt(r)` with rslora).
We keep `A = lora_A.T` [in, r] and `B = scale * lora_B.T` [r, out] in the compute dtype, so the
op is two plain matmuls `x @ A @ B` with nothing left to multiply.

Which modules an adapter targets, and each module's r and alpha, are resolved exactly as PEFT
resolves them (target_modules / exclude_modules / layers_to_transform / layers_pattern /
rank_pattern / alpha_pattern: mirrored from `peft.tuners.tuners_utils.check_target_module_exists`
and `peft.utils.other.get_pattern_key`), then checked against the tensors in the file: every
expected module must have both tensors, and no other tensor may be present.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import Tensor

from engine.config import LORA_MODULE_PARENT, LORA_MODULES
from engine.request import EngineError, ErrorType

if TYPE_CHECKING:
    from engine.model_loader import ModelSpec

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20

_UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
_TENSOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_MODULE_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<name>\w+)")
# Config fields whose feature changes the math or adds weights we do not serve. Each must be falsy.
_REFUSED_FIELDS = (
    "use_dora", "lora_bias", "modules_to_save", "target_parameters", "fan_in_fan_out",
    "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "use_qalora",
    "arrow_config", "use_bdlora", "kasa_config", "megatron_config",
)


@dataclass
class AdapterWeights:
    """Host copy of one validated PEFT adapter, ready to be copied into a device slot."""

    key: str  # AdapterRef.key
    rank: int  # max rank over its modules
    modules: dict[tuple[int, str], tuple[Tensor, Tensor]]  # (layer, module) -> (A [in, r], B [r, out] * scale)
    nbytes: int

    def pin_memory(self) -> AdapterWeights:
        """A copy in page-locked memory, so host -> device copies can be asynchronous (CUDA only)."""
        pinned = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in self.modules.items()}
        return AdapterWeights(self.key, self.rank, pinned, self.nbytes)


def _invalid(message: str) -> EngineError:
    return EngineError(ErrorType.ADAPTER_INVALID, message)


def _module_key(layer: int, name: str) -> str:
    """The module's name in `named_modules()` of the HF causal LM, which is what PEFT matches."""
    return f"model.layers.{layer}.{LORA_MODULE_PARENT[name]}.{name}"


def get_pattern_key(pattern_keys, key: str) -> str:
    """Mirror of `peft.utils.other.get_pattern_key`: the first pattern that matches a suffix of key."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _is_targeted(cfg: dict, key: str) -> bool:
    """Mirror of `peft.tuners.tuners_utils.check_target_module_exists` for one module key."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return targets == "all-linear" and key != "lm_head" or re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layer_indexes = cfg.get("layers_to_transform")
    if layer_indexes is None or (isinstance(layer_indexes, list) and not layer_indexes):
        return True
    patterns = cfg.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layer_indexes if isinstance(layer_indexes, int) else idx in layer_indexes


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise _invalid(f"{CONFIG_FILE} missing in the adapter directory")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise _invalid(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _invalid(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _invalid(f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def _check_config(cfg: dict, max_rank: int) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _invalid(f"peft_type {peft_type!r} is not supported (only LORA)")
    if cfg.get("bias", "none") != "none":
        raise _invalid(f"bias={cfg['bias']!r} is not supported (only 'none')")
    for name in _REFUSED_FIELDS:
        if cfg.get(name):
            raise _invalid(f"{name}={cfg[name]!r} is not supported")
    _check_patterns(cfg)
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise _invalid("target_modules must be a non-empty list or a regex string")
    if isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str):
                raise _invalid(f"target_modules holds a non-string entry {t!r}")
            if t.split(".")[-1] in _UNSUPPORTED_TARGETS:
                raise _invalid(f"target_modules: {t!r} is not supported (only {', '.join(LORA_MODULES)})")
    else:
        for key in ("model.embed_tokens", "lm_head"):
            if targets != "all-linear" and re.fullmatch(targets, key):
                raise _invalid(f"target_modules regex matches {key} (not supported)")
    for name in ("r", "lora_alpha"):
        v = cfg.get(name, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _invalid(f"{name} must be a number, got {v!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        for k, v in (cfg.get(name) or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _invalid(f"{name}[{k!r}] must be a number, got {v!r}")
    ranks = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    for r in ranks:
        if int(r) != r or not 1 <= r:
            raise _invalid(f"r / rank_pattern: rank must be an integer >= 1, got {r!r}")
        if r > max_rank:
            raise _invalid(f"r / rank_pattern: rank {r} exceeds max_lora_rank {max_rank}")


def _check_patterns(cfg: dict) -> None:
    """Types and regexes of the module-selection fields, so matching cannot raise later."""
    def regex(field: str, pattern) -> None:
        if not isinstance(pattern, str):
            raise _invalid(f"{field} holds a non-string entry {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise _invalid(f"{field}: invalid regex {pattern!r} ({e})") from None

    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = cfg.get(field)
        if value is None:
            continue
        if not isinstance(value, (str, list)):
            raise _invalid(f"{field} must be a string or a list of strings, got {value!r}")
        for pattern in [value] if isinstance(value, str) else value:
            regex(field, pattern)
    for field in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(field) or {}
        if not isinstance(value, dict):
            raise _invalid(f"{field} must be an object")
        for key in value:
            regex(field, key)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise _invalid(f"layers_to_transform must be an int or a list of ints, got {layers!r}")


def _expected_modules(cfg: dict, spec: ModelSpec) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, module) -> (r, alpha) for every module PEFT would wrap in this base model."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for layer in range(spec.num_layers):
        for name in LORA_MODULES:
            key = _module_key(layer, name)
            if _is_targeted(cfg, key):
                r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), cfg.get("r", 8))
                alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), cfg.get("lora_alpha", 8))
                out[(layer, name)] = (int(r), float(alpha))
    if not out:
        raise _invalid(f"target_modules {cfg['target_modules']!r} selects no module of {spec.base_model_name}")
    return out


def _parse_key(key: str, spec: ModelSpec) -> tuple[int, str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, "q_proj", "A")."""
    if "lora_magnitude_vector" in key:
        raise _invalid(f"tensor {key}: use_dora is not supported")
    if "lora_embedding_" in key or any(t in key for t in _UNSUPPORTED_TARGETS):
        raise _invalid(f"tensor {key}: embed_tokens / lm_head targets are not supported")
    if "modules_to_save" in key:
        raise _invalid(f"tensor {key}: modules_to_save is not supported")
    if ".lora_B.bias" in key or ".lora_A.bias" in key:
        raise _invalid(f"tensor {key}: lora_bias is not supported")
    m = _TENSOR_KEY.fullmatch(key)
    mm = _MODULE_KEY.fullmatch(m.group("module")) if m else None
    if m is None or mm is None or LORA_MODULE_PARENT.get(mm.group("name")) != mm.group("parent"):
        raise _invalid(f"unexpected tensor {key} (only lora_A/lora_B of {', '.join(LORA_MODULES)})")
    layer = int(mm.group("layer"))
    if layer >= spec.num_layers:
        raise _invalid(f"tensor {key}: layer {layer} but {spec.base_model_name} has {spec.num_layers} layers "
                       f"(adapter for a different base model?)")
    return layer, mm.group("name"), m.group("ab")


def _read_tensors(path: Path, spec: ModelSpec, expected: dict, allow_pickle: bool) -> dict[str, Tensor]:
    """Read the weights, checking names and shapes from the safetensors header before any data."""
    st_file, bin_file = path / SAFETENSORS_FILE, path / PICKLE_FILE
    if st_file.is_file():
        try:
            with safe_open(st_file, framework="pt") as f:
                keys = list(f.keys())
                for key in keys:
                    _check_shape(key, tuple(f.get_slice(key).get_shape()), spec, expected)
                return {key: f.get_tensor(key) for key in keys}
        except EngineError:
            raise
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise _invalid(f"{SAFETENSORS_FILE} is unreadable: {e}") from None
    if bin_file.is_file():
        if not allow_pickle:
            raise _invalid(f"{PICKLE_FILE} (pickle) needs allow_pickle; provide {SAFETENSORS_FILE}")
        try:
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _invalid(f"{PICKLE_FILE} is unreadable: {e}") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
            raise _invalid(f"{PICKLE_FILE} must hold a dict of tensors")
        for key, t in tensors.items():
            _check_shape(key, tuple(t.shape), spec, expected)
        return tensors
    raise _invalid(f"{SAFETENSORS_FILE} missing in the adapter directory")


def _check_shape(key: str, shape: tuple[int, ...], spec: ModelSpec, expected: dict) -> None:
    layer, name, ab = _parse_key(key, spec)
    if (layer, name) not in expected:
        raise _invalid(f"unexpected tensor {key}: target_modules does not select this module")
    r = expected[(layer, name)][0]
    fan_in, fan_out = spec.module_shapes[name]
    want = (r, fan_in) if ab == "A" else (fan_out, r)
    if shape != want:
        rank_dim = 0 if ab == "A" else 1
        what = ("rank differs from r / rank_pattern" if len(shape) == 2 and shape[rank_dim] != want[rank_dim]
                else "adapter for a different base model?")
        raise _invalid(f"tensor {key} has shape {list(shape)}, expected {list(want)} for "
                       f"{spec.base_model_name} ({what})")


def load_peft_adapter(path: Path, spec: ModelSpec, dtype: torch.dtype, max_rank: int,
                      allow_pickle: bool, key: str = "") -> AdapterWeights:
    """Load and validate the PEFT LoRA adapter in directory `path`; raise EngineError(ADAPTER_INVALID)
    naming the offending field or tensor for anything we cannot serve exactly."""
    path = Path(path)
    cfg = _read_config(path)
    _check_config(cfg, max_rank)
    expected = _expected_modules(cfg, spec)
    tensors = _read_tensors(path, spec, expected, allow_pickle)
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    nbytes = 0
    for (layer, name), (r, alpha) in expected.items():
        prefix = f"base_model.model.{_module_key(layer, name)}"
        a, b = tensors.get(f"{prefix}.lora_A.weight"), tensors.get(f"{prefix}.lora_B.weight")
        if a is None or b is None:
            raise _invalid(f"missing tensor {prefix}.lora_{'A' if a is None else 'B'}.weight "
                           f"(target_modules selects {_module_key(layer, name)})")
        for ab, t in (("A", a), ("B", b)):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise _invalid(f"tensor {prefix}.lora_{ab}.weight has non-finite or non-float values")
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        A = a.float().t().contiguous().to(dtype)  # [in, r]
        B = (b.float().t() * scale).contiguous().to(dtype)  # [r, out], scale folded in
        modules[(layer, name)] = (A, B)
        nbytes += A.nbytes + B.nbytes
    rank = max(A.shape[1] for A, _ in modules.values())
    return AdapterWeights(key=key or str(path), rank=rank, modules=modules, nbytes=nbytes)
